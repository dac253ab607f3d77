"""The one prediction path: records in, labelled scores out.

Batch evaluation, `mmops predict`, the Kafka consumer and any HTTP endpoint all call
`Predictor.predict_batch`, which decodes with the training code's own preprocessing and runs the
serving artifact the export stage chose (INT8 ONNX, FP32 ONNX or the torch model). Preprocessing
is numpy and `tokenizers` (`mmops.serving.inputs`), and the torch model is loaded only when the
torch backend serves, so an ONNX backend serves in the lean install without torch. Every file it
opens is first checked against the digests recorded with the model (`mmops.serving.integrity`);
another backend than the approved one serves only when a param says so, with a log line.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmops.config import BACKENDS, ModelConfig, PredictConfig, from_mapping
from mmops.model.example import Example
from mmops.model.folder import META_FILE, TOKENIZER_DIR, read_meta
from mmops.model.image_processing import image_spec_of, open_image
from mmops.serving.embeddings import References, load_references
from mmops.serving.inputs import ArrayCollator, text_encoder
from mmops.serving.integrity import (
    DamagedModelError,
    Manifest,
    read_manifest,
    require_digests,
    verify_model,
)
from mmops.serving.references import ModelIdentity
from mmops.serving.runners import EXPORT_FILE, ONNX_FILES, OnnxRunner, Outputs, Runner, run_loader

if TYPE_CHECKING:
    from mmops.model.storage import LoadedModel

log = logging.getLogger(__name__)

# A result's embeddings by modality, when asked for; never part of a prediction's JSON.
EMBEDS_KEY = "_embeds"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class RecordError(ValueError):
    """A record that cannot be predicted; the message names the field, `reason` is a short code."""

    def __init__(self, message: str, reason: str = "invalid_record") -> None:
        super().__init__(message)
        self.reason = reason


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
        self.manifest: Manifest = read_manifest(self.folder)
        require_digests(self.manifest, self.config.require_digests)
        # The files every backend opens; export.json and the ONNX files as the backend needs.
        per_backend = {EXPORT_FILE, *ONNX_FILES.values()}
        verify_model(self.folder, self.manifest, set(self.manifest.files or ()) - per_backend)
        self.meta = read_meta(self.folder)
        self.labels: list[str] = list(self.meta["labels"])
        self.model_config = from_mapping(ModelConfig, self.meta["model"], prefix="model")
        # The checkpoint's resize, crop and normalisation, as in training.
        self.image_spec = image_spec_of(self.meta)
        config = self.model_config
        tokenize = text_encoder(
            self.folder / TOKENIZER_DIR, config.max_text_length, config.text_padding
        )
        self.collate = ArrayCollator(tokenize, self.image_spec)
        self.export: dict[str, Any] | None = None  # export.json, once read
        # In memory with the model: the download it came in is gone once loaded.
        self.references: References | None = load_references(self.folder)
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
        from mmops.serving.references import download_model, model_identity

        # Everything is in memory once loaded, so the download goes: a consumer swapping
        # champions for months leaves nothing behind on disk.
        with tempfile.TemporaryDirectory(prefix="mmops-model-") as download:
            folder, run_id = download_model(model_ref, Path(download))
            pinned = read_manifest(folder).source  # an alias resolved to its version
            return cls(folder, backend, config, model_identity(pinned, run_id))

    @property
    def backend(self) -> str:
        return self.runner.name

    @cached_property
    def loaded(self) -> LoadedModel:
        """The torch model (the training install): loaded with the torch backend, else on first
        use, from a local folder (a registry download is gone once the predictor is built)."""
        from mmops.model.storage import load_model

        if not (self.folder / META_FILE).is_file():
            raise FileNotFoundError(
                f"{self.manifest.source}: the torch model was not loaded (backend "
                f"{self.backend}) and its download is gone; load it with backend='torch'"
            )
        return load_model(self.folder)

    def _runner(self, backend: str) -> Runner:
        """`backend`, or for auto the one the export approved: another one only by
        predict.fallback_backend, and logged."""
        source = self.manifest.source
        if backend != "auto":
            try:
                approved = self._approved()
            except DamagedModelError:
                approved = None  # export.json is not needed to run a backend named
            if approved not in (None, backend):
                log.info(
                    "%s: serving %s (asked for); the export approved %s", source, backend, approved
                )
            return self._backend_runner(backend)
        approved = None  # unknown while export.json cannot be read
        try:
            approved = self._approved()
            return self._backend_runner(approved)
        except DamagedModelError as error:
            fallback = self.config.fallback_backend
            if fallback in ("none", approved):
                raise
            try:
                runner = self._backend_runner(fallback)
            except (DamagedModelError, FileNotFoundError):
                raise error from None
            log.warning(
                "%s: serving %s instead of %s, which the export approved, as "
                "predict.fallback_backend says: %s",
                source,
                fallback,
                approved or "the backend",
                error.message,
            )
            return runner

    def _approved(self) -> str:
        """The backend the export's parity gate approved (export.json's `serving`); torch for a
        model never exported. DamagedModelError when export.json is damaged or lost."""
        exported = {EXPORT_FILE, *ONNX_FILES.values()}
        path = self.folder / EXPORT_FILE
        recorded = any(self.manifest.recorded(name) for name in exported)
        if not recorded and not any((self.folder / name).is_file() for name in exported):
            return "torch"
        verify_model(self.folder, self.manifest, [EXPORT_FILE])
        if not path.is_file():
            raise DamagedModelError(
                self.manifest.source,
                EXPORT_FILE,
                "missing, so which backend the parity gate approved is unknown",
            )
        try:
            export = json.loads(path.read_text())
            serving = export["serving"]
            if serving not in ("int8", "fp32", "torch"):
                raise ValueError(f"serving {serving!r}")
        except (ValueError, KeyError, TypeError) as error:
            raise DamagedModelError(
                self.manifest.source, EXPORT_FILE, f"cannot be read ({error})"
            ) from None
        self.export = export
        return str(serving)

    def _backend_runner(self, backend: str) -> Runner:
        """The runner of `backend`, its file checked first."""
        if backend == "torch":
            from mmops.serving.torch_runner import TorchRunner

            return TorchRunner(self.loaded)  # its files were checked before loading
        name = ONNX_FILES[backend]
        path = self.folder / name
        verify_model(self.folder, self.manifest, [name])
        if not path.is_file():
            if self.export is not None or self.manifest.recorded(name):
                raise DamagedModelError(self.manifest.source, name, "missing; the file was lost")
            raise FileNotFoundError(f"{path}: no {backend} ONNX model; run `mmops export`")
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph, InvalidProtobuf

        try:
            return OnnxRunner(path, backend, self.config.threads)
        except (InvalidProtobuf, InvalidGraph) as error:
            # A model with no recorded digests, damaged: one line, not ONNX Runtime's.
            first = str(error).strip().splitlines()[0].replace(str(path), name)
            raise DamagedModelError(
                self.manifest.source, name, f"cannot be loaded ({first[:300]})"
            ) from None

    def run(self, examples: Sequence[Example]) -> Outputs:
        """Class probabilities and embeddings for preprocessed examples, in batches."""
        size = self.config.batch_size
        batches = (self.collate(examples[i : i + size]) for i in range(0, len(examples), size))
        return run_loader(self.runner, batches, len(self.labels))

    def predict_batch(
        self,
        records: Iterable[Mapping[str, Any]],
        root: Path | str | None = None,
        embeddings: bool = False,
    ) -> list[dict[str, Any]]:
        """One result per record, in order: a label and scores, or an `error` naming the field.

        `root` resolves relative image paths; without it, image paths are refused (a stream of
        events must not read files off the serving machine). With `embeddings`, each predicted
        result also has EMBEDS_KEY: its embedding per modality (for drift monitoring).
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
            except Exception as error:  # one record's bytes never fail the others
                message = f"record: cannot preprocess ({type(error).__name__}: {error})"
                results.append(
                    {"id": record_id, "error": message[:1000], "reason": "preprocess_failed"}
                )
        outputs = self.run(examples)
        best = outputs.probs.argmax(axis=1).tolist()
        for row, (slot, index, probs) in enumerate(
            zip(slots, best, outputs.probs.tolist(), strict=True)
        ):
            results[slot].update(
                label=self.labels[index],
                scores=dict(zip(self.labels, probs, strict=True)),
            )
            if embeddings:
                results[slot][EMBEDS_KEY] = {m: e[row] for m, e in outputs.embeds.items()}
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
            pixels = self.image_spec.array(image)
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
            return open_image(data, max_pixels=cfg.max_image_pixels, spec=self.image_spec)
        except ValueError as error:  # too many pixels, checked before decoding
            raise RecordError(f"image: {error}", "image_too_many_pixels") from None
        except (OSError, SyntaxError, EOFError) as error:
            # PIL's UnidentifiedImageError, truncated files, and SyntaxError for a broken chunk
            raise RecordError(f"image: cannot decode ({error})", "image_undecodable") from None


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
