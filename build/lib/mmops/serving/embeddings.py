"""Reference embeddings: what a model version's inputs and outputs look like on held-out data.

The export stage stores them in the model folder it exports (`references.npz`, covered by the
folder's digests), so the registered version carries them and the `Predictor` of any consumer
loads them with the model: per modality the embedding the serving backend gives (image, text,
fused and whatever modality a model adds), and the class probabilities as the `prediction`
signal.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmops.serving.runners import Outputs

REFERENCES_FILE = "references.npz"
PREDICTION = "prediction"  # the signal of class probabilities, beside the modalities
FUSED = "fused"  # the head's input (`ModelOutput.embeddings`): moves when any modality does
DERIVED = (FUSED, PREDICTION)  # signals of the model, not of one input modality
_EMBED_PREFIX = "embeds/"


@dataclass(frozen=True)
class References:
    """Held-out embeddings per modality, the class probabilities and where they came from."""

    embeds: dict[str, np.ndarray]
    probs: np.ndarray
    labels: list[str]
    splits: list[str]
    backend: str

    @property
    def size(self) -> int:
        return len(self.probs)

    def signals(self) -> dict[str, np.ndarray]:
        """Every monitored signal by name: the modalities and `prediction`."""
        return {**self.embeds, PREDICTION: self.probs}

    def digest(self) -> str:
        """A content hash of the signals: what a calibration was made on."""
        digest = hashlib.blake2b(digest_size=16)
        for name, values in sorted(self.signals().items()):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(values).tobytes())
        return digest.hexdigest()

    def label_shares(self) -> np.ndarray:
        """The share of each label among the predicted labels."""
        counts = np.bincount(self.probs.argmax(1), minlength=len(self.labels))
        return counts / max(1, counts.sum())

    def mean_confidence(self) -> float:
        return float(self.probs.max(1).mean()) if self.size else float("nan")

    def save(self, folder: Path) -> Path:
        arrays = {f"{_EMBED_PREFIX}{name}": value for name, value in self.embeds.items()}
        meta = {"labels": self.labels, "splits": self.splits, "backend": self.backend}
        path = folder / REFERENCES_FILE
        with path.open("wb") as f:
            np.savez_compressed(f, probs=self.probs, meta=np.array(json.dumps(meta)), **arrays)
        return path


def sample_references(
    parts: dict[str, Outputs],
    labels: list[str],
    size: int,
    backend: str,
    seed: int = 0,
    present: dict[str, np.ndarray] | None = None,
) -> References:
    """At most `size` rows, drawn at random (seeded) from the outputs of the named splits.

    `present[modality]` marks the rows (of the splits in order) that have that modality: an
    absent one is the model's stand-in, not data, so it is left out of that modality's sample.
    """
    outputs = [part for part in parts.values() if len(part.probs)]
    if not outputs:
        raise ValueError("references: the held-out splits are empty")
    probs = np.concatenate([part.probs for part in outputs])
    names = [name for name in outputs[0].embeds if all(name in p.embeds for p in outputs)]
    rng = np.random.default_rng(seed)
    everything = np.ones(len(probs), dtype=bool)

    def sample(mask: np.ndarray) -> np.ndarray:
        rows = np.flatnonzero(mask)
        return np.sort(rng.permutation(rows)[:size])

    embeds = {}
    for name in names:
        value = np.concatenate([part.embeds[name] for part in outputs])
        keep = sample((present or {}).get(name, everything))
        embeds[name] = value[keep].astype(np.float32)
    return References(
        embeds,
        probs[sample(everything)].astype(np.float32),
        list(labels),
        [name for name, part in parts.items() if len(part.probs)],
        backend,
    )


def load_references(folder: Path) -> References | None:
    """A model folder's references; None for a model not exported, or exported before them."""
    path = folder / REFERENCES_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        embeds = {
            key.removeprefix(_EMBED_PREFIX): data[key]
            for key in data.files
            if key.startswith(_EMBED_PREFIX)
        }
        return References(embeds, data["probs"], meta["labels"], meta["splits"], meta["backend"])
