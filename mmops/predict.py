"""The one prediction path: records in, labelled scores out.

Batch evaluation, `mmops predict`, the Kafka consumer and any HTTP endpoint all call
`Predictor.predict_batch`, which decodes with the training code's own preprocessing and runs the
serving artifact the export stage chose (INT8 ONNX, FP32 ONNX or the torch model).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from mmops.config import PredictConfig
from mmops.model import META_FILE, LoadedModel, load_model
from mmops.preprocess import MODEL_INPUTS, Collator, Example, image_tensor, open_image

log = logging.getLogger(__name__)

EXPORT_FILE = "export.json"
ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
BACKENDS = ("auto", "int8", "fp32", "torch")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class RecordError(ValueError):
    """A record that cannot be predicted; the message names the field, `reason` is a short code."""

    def __init__(self, message: str, reason: str = "invalid_record") -> None:
        super().__init__(message)
        self.reason = reason


class Outputs(NamedTuple):
    probs: np.ndarray  # (n, classes)
    image_embeds: np.ndarray
    text_embeds: np.ndarray


class TorchRunner:
    """Runs the torch model on a collated batch."""

    name = "torch"

    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model.eval()
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, torch.Tensor]) -> Outputs:
        inputs = {k: batch[k].to(self.device) for k in MODEL_INPUTS}
        output = self.model(**inputs)
        return Outputs(
            output.logits.float().softmax(-1).cpu().numpy(),
            output.image_embeds.float().cpu().numpy(),
            output.text_embeds.float().cpu().numpy(),
        )


class OnnxRunner:
    """Runs an exported ONNX model (FP32 or INT8) with ONNX Runtime on a collated batch."""

    def __init__(self, path: Path, name: str, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = [
            p
            for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in ort.get_available_providers()
        ]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.name = name

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> Outputs:
        feeds = {name: batch[name].numpy() for name in self.inputs}
        probs, image_embeds, text_embeds = self.session.run(None, feeds)
        return Outputs(probs, image_embeds, text_embeds)


Runner = TorchRunner | OnnxRunner


@dataclass(frozen=True)
class ModelIdentity:
    """What a prediction names as its source: a registered model and version, or a folder."""

    name: str
    version: str
    run_id: str | None = None


class Predictor:
    """A loaded model behind `predict_batch`; build one with `Predictor.load`."""

    def __init__(
        self,
        folder: Path | str,
        backend: str = "auto",
        config: PredictConfig | None = None,
        identity: ModelIdentity | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.folder = Path(folder)
        self.config = config or PredictConfig()
        self.loaded = load_model(self.folder)
        self.labels = self.loaded.labels
        model_config = self.loaded.model.config
        self.image_size = model_config.image_size
        self.collate = Collator(
            self.loaded.tokenizer, model_config.image_size, model_config.max_text_length
        )
        self.export = _read_export(self.folder)
        self.runner = self._runner(backend)
        self.identity = identity or ModelIdentity(self.folder.resolve().name, "local")

    @classmethod
    def load(
        cls, model_ref: str, backend: str = "auto", config: PredictConfig | None = None
    ) -> Predictor:
        """A predictor from a folder, `runs:/<id>/<path>` or `models:/<name>@<alias>|/<version>`."""
        local = Path(model_ref)
        if (local / META_FILE).is_file():
            return cls(local, backend, config)
        from mmops.tracking import model_identity, resolve_model

        folder, run_id = resolve_model(model_ref)
        return cls(folder, backend, config, model_identity(model_ref, run_id))

    @property
    def backend(self) -> str:
        return self.runner.name

    def _runner(self, backend: str) -> TorchRunner | OnnxRunner:
        if backend == "torch":
            return TorchRunner(self.loaded)
        if backend in ONNX_FILES:
            path = self.folder / ONNX_FILES[backend]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no {backend} ONNX model; run `mmops export`")
            return OnnxRunner(path, backend, self.config.threads)
        serving = (self.export or {}).get("serving", "torch")
        if serving in ONNX_FILES and (self.folder / ONNX_FILES[serving]).is_file():
            return OnnxRunner(self.folder / ONNX_FILES[serving], serving, self.config.threads)
        return TorchRunner(self.loaded)

    def run(self, examples: Sequence[Example]) -> Outputs:
        """Class probabilities and embeddings for preprocessed examples, in batches."""
        size = self.config.batch_size
        batches = (self.collate(examples[i : i + size]) for i in range(0, len(examples), size))
        return run_loader(self.runner, batches, len(self.labels))

    def predict_batch(
        self, records: Iterable[Mapping[str, Any]], root: Path | str | None = None
    ) -> list[dict[str, Any]]:
        """One result per record, in order: a label and scores, or an `error` naming the field.

        `root` resolves relative image paths; without it, image paths are refused (a stream of
        events must not read files off the serving machine).
        """
        results: list[dict[str, Any]] = []
        examples: list[Example] = []
        slots: list[int] = []
        for record in records:
            record_id = _record_id(record)
            try:
                examples.append(self.example(record, root))
                slots.append(len(results))
                results.append({"id": record_id})
            except RecordError as error:
                results.append({"id": record_id, "error": str(error), "reason": error.reason})
        outputs = self.run(examples)
        best = outputs.probs.argmax(axis=1).tolist()
        for slot, index, probs in zip(slots, best, outputs.probs.tolist(), strict=True):
            results[slot].update(
                label=self.labels[index],
                scores=dict(zip(self.labels, probs, strict=True)),
            )
        for result in results:
            result.update(model=self.identity.name, version=self.identity.version)
        return results

    def example(self, record: Mapping[str, Any], root: Path | str | None = None) -> Example:
        """The training preprocessing applied to one record; RecordError names a bad field."""
        if not isinstance(record, Mapping):
            raise RecordError(
                f"record: expected an object, got {type(record).__name__}", "not_object"
            )
        if "_invalid" in record:
            raise RecordError(f"record: invalid JSON ({record['_invalid']})", "not_json")
        if "id" not in record or record["id"] is None or record["id"] == "":
            raise RecordError("id: missing", "missing_field")
        text = record.get("text")
        if text is not None and not isinstance(text, str):
            raise RecordError(
                f"text: expected a string or null, got {type(text).__name__}", "wrong_type"
            )
        if text is not None and len(text) > self.config.max_text_chars:
            raise RecordError(
                f"text: {len(text)} characters exceeds predict.max_text_chars "
                f"({self.config.max_text_chars})",
                "text_too_long",
            )
        source = record.get("image")
        pixels = None
        if source is not None:
            image = self._open(source, root)
            pixels = image_tensor(image, self.image_size)
        if pixels is None and text is None:
            raise RecordError("image, text: the record has neither", "missing_field")
        return Example(pixels, text, -1)

    def _open(self, source: Any, root: Path | str | None) -> Any:
        cfg = self.config
        if isinstance(source, str) and root is not None and _looks_like_path(source):
            path = Path(root) / source
            if not path.is_file():
                raise RecordError(f"image: no such file {source!r}", "image_missing")
            size = path.stat().st_size
            data: str | Path | bytes = path
        else:
            data = _image_bytes(source)
            size = len(data)
        if size > cfg.max_image_bytes:
            raise RecordError(
                f"image: {size} bytes exceeds predict.max_image_bytes ({cfg.max_image_bytes})",
                "image_too_large",
            )
        try:
            return open_image(data, max_pixels=cfg.max_image_pixels)
        except ValueError as error:  # too many pixels, checked before decoding
            raise RecordError(f"image: {error}", "image_too_many_pixels") from None
        except OSError as error:  # PIL's UnidentifiedImageError and truncated files
            raise RecordError(f"image: cannot decode ({error})", "image_undecodable") from None


def run_loader(
    runner: Runner, batches: Iterable[Mapping[str, torch.Tensor]], num_labels: int = 0
) -> Outputs:
    """A runner's outputs over collated batches, concatenated in order."""
    parts = [runner(batch) for batch in batches]
    if not parts:
        return Outputs(np.zeros((0, num_labels)), np.zeros((0, 0)), np.zeros((0, 0)))
    return Outputs(*(np.concatenate(x) for x in zip(*parts, strict=True)))


def measure_latency(
    runner: Runner, batch: Mapping[str, torch.Tensor], repeats: int
) -> dict[str, float]:
    """p50/p95 milliseconds of one batch through `runner`, and examples per second at p50."""
    for _ in range(3):  # warm-up: first calls allocate and pick kernels
        runner(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(batch)  # outputs come back as numpy: GPU work has finished when it returns
        times.append((time.perf_counter() - start) * 1000)
    p50 = float(np.percentile(times, 50))
    return {
        "p50_ms": p50,
        "p95_ms": float(np.percentile(times, 95)),
        "throughput_per_s": len(batch["pixel_values"]) / (p50 / 1000),
    }


def cycled_batch(
    collate: Collator, examples: Sequence[Example], size: int
) -> dict[str, torch.Tensor]:
    """A batch of exactly `size` examples, repeating them when there are fewer (for timing)."""
    return collate([examples[i % len(examples)] for i in range(size)])


def _record_id(record: Any) -> Any:
    return record.get("id") if isinstance(record, Mapping) else None


def _looks_like_path(source: str) -> bool:
    return Path(source).suffix.lower() in IMAGE_SUFFIXES and len(source) < 4096


def _image_bytes(source: Any) -> bytes:
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    if isinstance(source, str):
        try:
            return base64.b64decode(source, validate=True)
        except (binascii.Error, ValueError):
            raise RecordError(
                "image: not base64 (a path is only accepted with a dataset root)",
                "image_not_base64",
            ) from None
    raise RecordError(
        f"image: expected bytes, base64 text or a path, got {type(source).__name__}", "wrong_type"
    )


def _read_export(folder: Path) -> dict[str, Any] | None:
    path = folder / EXPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def predict_to_file(
    predictor: Predictor,
    records: Iterable[Any],
    out: Path | str,
    root: Path | str | None = None,
) -> dict[str, Any]:
    """Predict records in batches and write one JSON line per record; returns a summary."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = predictor.config.batch_size
    counts: dict[str, int] = {}
    total = errors = 0
    with out.open("w", encoding="utf-8") as f:
        for chunk in _chunks(records, size):
            for result in predictor.predict_batch(chunk, root):
                total += 1
                if "error" in result:
                    errors += 1
                else:
                    counts[result["label"]] = counts.get(result["label"], 0) + 1
                f.write(json.dumps(result, default=str) + "\n")
    return {
        "records": total,
        "errors": errors,
        "labels": counts,
        "backend": predictor.backend,
        "model": predictor.identity.name,
        "version": predictor.identity.version,
        "out": str(out),
    }


def read_records(path: Path | str) -> Iterable[Any]:
    """Records from a JSONL file, lazily; a line that is not JSON becomes an error record."""
    with Path(path).open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                yield {"id": f"{Path(path).name}:{lineno}", "_invalid": error.msg}


def _chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
