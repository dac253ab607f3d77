"""The model a server serves: pinned, or following an alias (the champion) as it moves.

The Kafka consumer and the HTTP/gRPC server share it; a new version is swapped in between
batches."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from mmops.config import PredictConfig
from mmops.serving.integrity import DamagedModelError
from mmops.serving.logs import log_data
from mmops.serving.predictor import Predictor
from mmops.serving.references import RegistryRef, alias_version

# A version that failed to load is tried again after poll_s, then twice as long each time, up
# to this: a broken registration neither hammers the registry nor is given up on.
MAX_RETRY_S = 600.0

log = logging.getLogger(__name__)

Served = TypeVar("Served")


class ModelSource:
    """The predictor to serve: a pinned model, or an alias re-resolved every `poll_s` seconds.

    A new version is loaded in a background thread and handed over by `swap`, which the consumer
    calls between batches, so each event is served by exactly one version. A version that fails
    to load, or fails every event of a batch that the last good version predicts, is not served:
    the last good version goes on, with a log line and `on_failure(stage, version)` (stage
    `damaged` for files not as recorded, `load` for other load failures, `predict`). A followed
    champion damaged at start is waited out: `load` returns once a version loads.
    """

    def __init__(
        self, model_ref: str, config: PredictConfig, poll_s: float, follow: bool | None = None
    ) -> None:
        self.model_ref = model_ref
        self.config = config
        self.poll_s = poll_s
        self.registry_ref = RegistryRef.parse(model_ref)
        alias = self.registry_ref is not None and self.registry_ref.alias is not None
        self.follow = alias if follow is None else follow and alias
        self.current: Predictor | None = None
        self.on_failure: Callable[[str, str], None] = lambda stage, version: None
        self._pending: Predictor | None = None
        self._last_good: Predictor | None = None  # the last version that predicted an event
        self._rejected: set[str] = set()  # versions that failed to predict: not loaded again
        self._failed_loads: dict[str, tuple[int, float]] = {}  # version: (failures, retry at)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.waiting_for: str | None = None  # while `load` waits: why, in one line

    def load(
        self, stop: threading.Event | None = None, beat: Callable[[], None] | None = None
    ) -> Predictor | None:
        """The model to serve (the alias's current version when following), once it loads.

        A pinned model that fails to load raises. A followed champion whose files are damaged
        is logged, counted and waited out: the alias is resolved again every `poll_s`, and
        `beat()` called, until a version loads; None if `stop` (or `close`) comes first.
        """
        if not self.follow:
            self.current = Predictor.load(self.model_ref, self.config.backend, self.config)
            return self.current
        self.current = self._first_champion(stop or self._stop, beat)
        if self.current is None:
            return None
        self._thread = threading.Thread(target=self._watch, name="model-watch", daemon=True)
        self._thread.start()
        return self.current

    @property
    def loaded(self) -> bool:
        """A model is loaded to serve (False while `load` waits for a loadable champion)."""
        return self.current is not None

    @property
    def ready(self) -> bool:
        """A new version is loaded and waits for `swap`."""
        with self._lock:
            return self._pending is not None

    def swap(self) -> Predictor | None:
        """The newly loaded champion, once, if there is one; it becomes `current`."""
        with self._lock:
            new, self._pending = self._pending, None
        if new is not None:
            self.current = new
        return new

    def serve_batch(
        self,
        predictor: Predictor,
        predict: Callable[[Predictor], Served],
        served_any: Callable[[Served], bool],
        model_failed: Callable[[Served], bool],
    ) -> Served:
        """`predict(predictor)`; when nothing is `served_any` and the cause is the model
        (`model_failed`) and the last good version serves the batch, `predictor` is rejected and
        the batch served by the last good version."""
        served = predict(predictor)
        if served_any(served):
            with self._lock:
                self._last_good = predictor
            return served
        good = self._last_good
        if good is None or good is predictor or not model_failed(served):
            return served
        retried = predict(good)
        if served_any(retried):
            self._reject(predictor, good)
            return retried
        return served  # the records themselves fail: the version stays

    def _reject(self, bad: Predictor, good: Predictor) -> None:
        version = bad.identity.version
        with self._lock:
            first = version not in self._rejected
            self._rejected.add(version)
            if self.current is bad and self._pending in (None, bad):
                self._pending = good  # swapped back between batches, like a new champion
        if first:
            log.error(
                "champion fails to predict; serving the last good version",
                extra=log_data(version=version, serving=good.identity.version),
            )
            self.on_failure("predict", version)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _resolve(self) -> str:
        ref = self.registry_ref
        assert ref is not None and ref.alias is not None  # only an alias is followed
        return alias_version(ref.name, ref.alias)

    def _load(self, version: str) -> Predictor:
        assert self.registry_ref is not None
        pinned = self.registry_ref.at_version(version)
        return Predictor.load(pinned, self.config.backend, self.config)

    def _first_champion(
        self, stop: threading.Event, beat: Callable[[], None] | None
    ) -> Predictor | None:
        damaged = False  # once waiting, registry trouble is waited through too
        while True:
            if beat is not None:
                beat()
            version = "?"
            try:
                version = self._resolve()
                if self._due(version):
                    predictor = self._load(version)
                    self._failed_loads.pop(version, None)
                    self.waiting_for = None
                    if damaged:
                        log.info("loaded a champion; serving", extra=log_data(version=version))
                    return predictor
            except DamagedModelError as error:
                damaged = True
                self._load_failed(version, error, "champion is damaged; waiting for a good one")
            except Exception as error:
                if not damaged:
                    raise
                log.warning(
                    "champion check failed; still waiting for a loadable champion",
                    extra=log_data(error=f"{type(error).__name__}: {error}"[:1000]),
                )
            if stop.wait(self.poll_s) or self._stop.is_set():
                return None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                version = self._resolve()
            except Exception as error:  # keep serving the current model through registry trouble
                log.warning(
                    "champion check failed; still serving the current model",
                    extra=log_data(error=f"{type(error).__name__}: {error}"),
                )
                continue
            with self._lock:
                seen = self._pending or self.current
            if seen is not None and version == seen.identity.version:
                continue
            if version in self._rejected or not self._due(version):
                continue
            self._try_load(version)

    def _load_failed(self, version: str, error: Exception, message: str) -> None:
        """Log and count a version that failed to load; it is tried again after a backoff."""
        count = self._failed_loads.get(version, (0, 0.0))[0] + 1
        retry_s = min(MAX_RETRY_S, self.poll_s * 2**count)
        self._failed_loads[version] = (count, time.monotonic() + retry_s)
        current = self.current.identity.version if self.current is not None else None
        damaged = isinstance(error, DamagedModelError)
        # A damaged file's message names the version, the file and `mmops rollback`.
        text = str(error) if damaged else f"{type(error).__name__}: {error}"
        if self.current is None:
            self.waiting_for = f"v{version}: {text}"[:1000]
        log.error(
            message,
            extra=log_data(version=version, serving=current, error=text[:1000], retry_in_s=retry_s),
        )
        self.on_failure("damaged" if damaged else "load", version)

    def _due(self, version: str) -> bool:
        failures = self._failed_loads.get(version)
        return failures is None or time.monotonic() >= failures[1]

    def _try_load(self, version: str) -> None:
        try:
            predictor = self._load(version)
        except Exception as error:
            self._load_failed(
                version, error, "champion fails to load; still serving the current model"
            )
            return
        self._failed_loads.pop(version, None)
        with self._lock:
            self._pending = predictor
        log.info("loaded new champion", extra=log_data(version=version))
