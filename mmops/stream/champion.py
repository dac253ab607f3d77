"""The model a consumer serves: pinned, or following an alias (the champion) as it moves."""

from __future__ import annotations

import logging
import threading

from mmops.config import PredictConfig
from mmops.serving.predictor import Predictor
from mmops.serving.references import RegistryRef, alias_version
from mmops.stream.logs import log_data

log = logging.getLogger(__name__)


class ModelSource:
    """The predictor to serve: a pinned model, or an alias re-resolved every `poll_s` seconds.

    A new version is loaded in a background thread and handed over by `swap`, which the consumer
    calls between batches, so each event is served by exactly one version.
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
        self._pending: Predictor | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def load(self) -> Predictor:
        """Load the model now (the alias's current version when following)."""
        self.current = (
            self._load(self._resolve())
            if self.follow
            else Predictor.load(self.model_ref, self.config.backend, self.config)
        )
        if self.follow:
            self._thread = threading.Thread(target=self._watch, name="model-watch", daemon=True)
            self._thread.start()
        return self.current

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

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                version = self._resolve()
                with self._lock:
                    seen = self._pending or self.current
                if seen is not None and version == seen.identity.version:
                    continue
                predictor = self._load(version)
                with self._lock:
                    self._pending = predictor
                log.info("loaded new champion", extra=log_data(version=version))
            except Exception as error:  # keep serving the current model through registry trouble
                log.warning(
                    "champion check failed; still serving the current model",
                    extra=log_data(error=f"{type(error).__name__}: {error}"),
                )
