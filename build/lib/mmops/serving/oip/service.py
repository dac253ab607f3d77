"""The model behind the v2 routes, for REST and gRPC alike: tensors in, batched, tensors out.

Request tensors become records, records go through the batcher and `Predictor.predict_batch`,
results become response tensors.

The model takes `id`, `text` and `image`, each `BYTES [N]` (an empty element is an absent text
or image; `id` may be left out), and answers `label` (`BYTES [N]`), `scores` (`FP32 [N, C]`, in
the order of the model metadata's labels) and `model_version` (`BYTES [N]`). Images are the
encoded file bytes (base64 text over JSON without binary data); a path or URL is refused, never
read. A record the predictor refuses fails its request with a 400 naming the input, its index
and the record's own error.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmops.serving.champion import ModelSource
from mmops.serving.logs import log_data
from mmops.serving.oip.batcher import AdaptiveBatcher
from mmops.serving.oip.protocol import (
    InferInput,
    InferOutput,
    InferRequest,
    InferResponse,
    ProtocolError,
)
from mmops.serving.predictor import Predictor

log = logging.getLogger(__name__)

INPUTS = ("id", "text", "image")
OUTPUTS = ("label", "scores", "model_version")
# The first bytes of the formats a model decodes (PNG, JPEG): never mistaken for a path.
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff")
_PATHLIKE = (b"/", b"./", b"../", b"~", b"file:", b"http:", b"https:", b"s3:", b"gs:", b"\\\\")
_SUFFIXES = (b".png", b".jpg", b".jpeg", b".webp", b".bmp", b".gif", b".tif", b".tiff")


@dataclass(frozen=True)
class Served:
    """A batch's results and the version that served them, or the model's exception."""

    predictor: Predictor
    results: list[dict[str, Any]] | None
    error: BaseException | None = None


@dataclass(frozen=True)
class Pending:
    """A request queued for a batch: what it asked for, and the batch's future."""

    request: InferRequest
    wanted: set[str]
    future: Future[Any]


class InferenceService:
    """The served model (pinned or the followed champion) behind an adaptive batcher."""

    def __init__(
        self,
        source: ModelSource,
        batcher_args: dict[str, Any],
        name: str | None = None,
        on_swap: Callable[[], None] = lambda: None,
    ) -> None:
        self.source = source
        self._name = name
        self.on_swap = on_swap
        self.swaps = 0
        self._lock = threading.Lock()
        self.batcher = AdaptiveBatcher(self._run, before_batch=self._swap, **batcher_args)

    @property
    def predictor(self) -> Predictor | None:
        return self.source.current

    @property
    def name(self) -> str:
        """The name routes answer to: the registered model's (or --name)."""
        predictor = self.predictor
        return self._name or (predictor.identity.name if predictor else "")

    @property
    def version(self) -> str:
        predictor = self.predictor
        return predictor.identity.version if predictor else ""

    def check_model(self, name: str, version: str | None = None) -> Predictor:
        """The predictor serving `name` (at `version`, when given); a 404 otherwise."""
        predictor = self.predictor
        if predictor is None:
            raise ProtocolError("no model is loaded yet", 503)
        if name != self.name:
            raise ProtocolError(f"model {name!r:.100}: not served here (serving {self.name})", 404)
        if version not in (None, "", predictor.identity.version):
            raise ProtocolError(
                f"model {name} version {version!r:.40}: not served "
                f"(serving version {predictor.identity.version})",
                404,
            )
        return predictor

    def start(self, request: InferRequest) -> Pending:
        """Queue a request's records for a batch; ProtocolError for anything the client sent."""
        self.check_model(request.model_name, request.model_version)
        wanted = _requested(request)
        records = to_records(request)
        return Pending(request, wanted, self.batcher.submit(records))

    def finish(self, pending: Pending, outcome: list[tuple[Predictor, dict[str, Any]]]) -> Any:
        """The response to a request whose batch has run (`outcome`: the batch future's)."""
        served_by, results = outcome[0][0], [result for _, result in outcome]
        errors = [_record_error(i, r) for i, r in enumerate(results) if "error" in r]
        if errors:
            raise ProtocolError("; ".join(errors)[:2000])
        version = served_by.identity.version
        outputs = to_outputs(results, served_by.labels, version)
        chosen = [output for output in outputs if output.name in pending.wanted]
        return InferResponse(self.name, version, pending.request.id, chosen)

    def infer(self, request: InferRequest, timeout_s: float) -> InferResponse:
        """`start` and `finish`, waiting for the batch (gRPC's worker threads)."""
        pending = self.start(request)
        try:
            outcome = pending.future.result(timeout=timeout_s)
        except TimeoutError:
            pending.future.cancel()
            raise ProtocolError(f"no result within {timeout_s:g} s (server busy)", 503) from None
        return self.finish(pending, outcome)

    def _run(self, records: list[dict[str, Any]]) -> list[tuple[Predictor, dict[str, Any]]]:
        """Each record's result and the version that served it (one version a batch)."""
        predictor = self.source.current
        assert predictor is not None  # requests are refused until a model loads
        served = self.source.serve_batch(predictor, _predict(records), _served_any, _failed)
        if served.error is not None:
            raise served.error
        assert served.results is not None
        return [(served.predictor, result) for result in served.results]

    def _swap(self) -> None:
        new = self.source.swap()
        if new is not None:
            self.swaps += 1
            self.on_swap()
            log.info(
                "serving new champion",
                extra=log_data(model=new.identity.name, version=new.identity.version),
            )


def _predict(records: list[dict[str, Any]]) -> Any:
    def predict(model: Predictor) -> Served:
        try:
            return Served(model, model.predict_batch(records))
        except Exception as error:  # the model itself failed: the last good version may serve
            log.exception("prediction failed", extra=log_data(version=model.identity.version))
            return Served(model, None, error)

    return predict


def _served_any(served: Served) -> bool:
    return served.results is not None


def _failed(served: Served) -> bool:
    return served.error is not None


def _requested(request: InferRequest) -> set[str]:
    if not request.outputs:
        return set(OUTPUTS)
    unknown = [o.name for o in request.outputs if o.name not in OUTPUTS]
    if unknown:
        raise ProtocolError(
            f"outputs.{unknown[0]:.80}: no such output (the model has {', '.join(OUTPUTS)})"
        )
    return {o.name for o in request.outputs}


def to_records(request: InferRequest) -> list[dict[str, Any]]:
    """The predictor's records from the request's `id`, `text` and `image` tensors."""
    unknown = sorted(set(request.inputs) - set(INPUTS))
    if unknown:
        raise ProtocolError(
            f"inputs.{unknown[0]:.80}: no such input (the model takes {', '.join(INPUTS)})"
        )
    if "text" not in request.inputs and "image" not in request.inputs:
        raise ProtocolError("inputs: give text, image or both")
    columns = {name: _elements(tensor) for name, tensor in request.inputs.items()}
    sizes = {name: len(values) for name, values in columns.items()}
    if len(set(sizes.values())) > 1:
        raise ProtocolError(f"inputs: every input needs the same batch size, got {sizes}")
    count = next(iter(sizes.values()))
    prefix = request.id or "request"
    ids = columns.get("id") or [f"{prefix}:{i}".encode() for i in range(count)]
    texts = columns.get("text") or [b""] * count
    images = columns.get("image") or [b""] * count
    image_tensor = request.inputs.get("image")
    records = []
    for i in range(count):
        record = {"id": _utf8("id", i, ids[i]) or f"{prefix}:{i}"}
        record["text"] = _utf8("text", i, texts[i]) if texts[i] else None
        record["image"] = _image(image_tensor, i, images[i]) if images[i] else None
        records.append(record)
    return records


def _elements(tensor: InferInput) -> list[bytes]:
    where = f"inputs.{tensor.name}"
    if tensor.datatype != "BYTES":
        raise ProtocolError(f"{where}.datatype: expected BYTES, got {tensor.datatype}")
    if len(tensor.shape) != 1 and not (len(tensor.shape) == 2 and tensor.shape[1] == 1):
        raise ProtocolError(f"{where}.shape: expected [N] (or [N, 1]), got {tensor.shape}")
    return [bytes(item) for item in tensor.data]


def _utf8(name: str, index: int, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"inputs.{name}[{index}]: not UTF-8 text") from None


def _image(tensor: InferInput | None, index: int, value: bytes) -> bytes:
    """An image element's file bytes; base64 text over JSON; a path or URL refused."""
    where = f"inputs.image[{index}]"
    if tensor is not None and tensor.from_json:
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            if _pathlike(value):
                raise ProtocolError(f"{where}: a path or URL is refused; send the image") from None
            raise ProtocolError(f"{where}: not base64 (JSON carries an image as base64)") from None
    if _pathlike(value):
        raise ProtocolError(f"{where}: a path or URL is refused; send the image's bytes")
    return value


def _pathlike(value: bytes) -> bool:
    if value.startswith(IMAGE_MAGIC) or len(value) > 4096:
        return False
    lowered = value.strip().lower()
    return lowered.startswith(_PATHLIKE) or lowered.endswith(_SUFFIXES) or b"://" in lowered


def _record_error(index: int, result: dict[str, Any]) -> str:
    message = str(result["error"])
    field = message.split(":", 1)[0]
    if field in INPUTS:
        return f"inputs.{field}[{index}]: {message.split(':', 1)[1].strip()}"
    return f"record {index}: {message}"


def to_outputs(
    results: Sequence[dict[str, Any]], labels: Sequence[str], version: str
) -> list[InferOutput]:
    """The response tensors of predicted results, scores in `labels` order."""
    order = list(labels)
    scores = np.array(
        [[r["scores"][label] for label in order] for r in results], dtype=np.float32
    ).reshape(len(results), len(order))
    return [
        InferOutput("label", "BYTES", [len(results)], [r["label"].encode() for r in results]),
        InferOutput("scores", "FP32", [len(results), len(order)], scores),
        InferOutput("model_version", "BYTES", [len(results)], [version.encode()] * len(results)),
    ]
