"""The params.yaml sections as frozen dataclasses; each checks its own keys on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mmops.config.errors import ConfigError
from mmops.config.learning import (
    ModelConfig,
    TrainConfig,
)
from mmops.config.serving import ServeConfig

# What serves predictions: what the export chose (auto), INT8 or FP32 ONNX, or the torch model.
BACKENDS = ("auto", "int8", "fp32", "torch")
# What `auto` may serve when the approved backend's file is damaged or missing: nothing (refuse).
FALLBACK_BACKENDS = ("none", "fp32", "torch")
# The image formats a dataset may hold and serving decodes (Pillow's names): one list, so serving
# never decodes a format that validation would have refused in training data.
IMAGE_FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class SplitRatios:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        ratios = dataclasses.asdict(self)
        if any(r < 0 for r in ratios.values()) or abs(sum(ratios.values()) - 1.0) > 1e-6:
            raise ConfigError(f"data.split: ratios must be >= 0 and sum to 1, got {ratios}")


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/demo"
    split: SplitRatios = field(default_factory=SplitRatios)
    # A null image or text is a missing modality; 0.0 means none may be missing.
    max_missing_image_rate: float = 0.0
    max_missing_text_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_missing_image_rate", "max_missing_text_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"data.{name}: must be between 0 and 1")


@dataclass(frozen=True)
class DemoDataConfig:
    n: int = 2000
    seed: int = 0
    image_size: int = 64

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError("demo_data.n: must be >= 1")
        if not 32 <= self.image_size <= 1024:
            raise ConfigError("demo_data.image_size: must be between 32 and 1024")


@dataclass(frozen=True)
class SplitSizes:
    train: int = 50
    val: int = 10
    test: int = 10


@dataclass(frozen=True)
class ImageLimits:
    min_side: int = 16
    max_side: int = 4096
    # Checked from the header before decoding, so a decompression bomb never gets decoded.
    max_pixels: int = 16_777_216
    max_file_mb: float = 20.0


@dataclass(frozen=True)
class ValidateConfig:
    # The expected label set; null accepts any labels.
    labels: tuple[str, ...] | None = None
    min_examples_per_class: int = 10
    min_split_size: SplitSizes = field(default_factory=SplitSizes)
    text_min_chars: int = 1
    text_max_chars: int = 1000
    # Largest class count divided by the smallest.
    max_class_imbalance: float = 20.0
    image: ImageLimits = field(default_factory=ImageLimits)
    # Processes that decode images; 0 means one per CPU core.
    workers: int = 0


@dataclass(frozen=True)
class BaselineConfig:
    """The classical model every retrain trains on the same splits (mmops.evaluation.baseline)."""

    image_size: int = 16  # pixels per side of the downsampled image features
    max_vocab: int = 5000  # bag-of-words vocabulary from the train texts
    seed: int = 0


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 128
    latency_batch_sizes: tuple[int, ...] = (1, 8, 32)
    latency_repeats: int = 20
    bootstrap_samples: int = 1000
    calibration_bins: int = 15
    # Robustness perturbations: Gaussian pixel noise (std in 0..1 pixel units), blur radius
    # in pixels, and the share of words given a typo.
    noise_std: float = 0.1
    blur_radius: float = 1.5
    typo_rate: float = 0.3
    seed: int = 0
    out_dir: str = "reports/evaluate"
    baseline: BaselineConfig = field(default_factory=BaselineConfig)


@dataclass(frozen=True)
class ZeroShotConfig:
    """A dual encoder classifying from label prompts (`mmops zero-shot`; the gate's floor)."""

    # A label's embedding: the mean of its prompts' normalised text embeddings, normalised.
    # `{label}` stands for the label, `_` read as a space.
    templates: tuple[str, ...] = ("a photo of a {label}.", "{label}")
    out_dir: str = "models/zero_shot"  # the model folder (model/) and its evaluation

    def __post_init__(self) -> None:
        if not self.templates:
            raise ConfigError("zero_shot.templates: give at least one, e.g. 'a {label}.'")
        for i, template in enumerate(self.templates):
            if "{label}" not in template:
                raise ConfigError(
                    f"zero_shot.templates[{i}]: {template!r} does not contain {{label}}"
                )


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export, INT8 quantization and the parity gate the INT8 model must pass to serve."""

    # INT8 may trail torch by this much test accuracy (0.01 = 1 point), per-class recall by
    # max_recall_drop; the two must agree on min_agreement of the test split.
    max_accuracy_drop: float = 0.01
    max_recall_drop: float = 0.05
    min_agreement: float = 0.99
    # FP32 ONNX must match torch this closely (largest absolute difference of a class score).
    fp32_tolerance: float = 1e-3
    latency_batch_sizes: tuple[int, ...] = (1, 8, 32)
    latency_repeats: int = 20
    out_dir: str = "models/export"

    def __post_init__(self) -> None:
        for name in ("max_accuracy_drop", "max_recall_drop", "min_agreement"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"export.{name}: must be between 0 and 1")


@dataclass(frozen=True)
class PredictConfig:
    """The prediction path shared by `mmops predict`, the stream consumer and endpoints."""

    backend: str = "auto"  # auto (what the export chose) | int8 | fp32 | torch
    batch_size: int = 64
    threads: int = 0  # ONNX Runtime intra-op threads; 0 lets it pick
    # Per-record limits: a record over one gets an error naming the field, not an exception.
    max_image_bytes: int = 10_000_000
    max_image_pixels: int = 16_777_216  # checked from the header, before decoding
    max_text_chars: int = 1000
    # Serve this, with a warning, when `auto`'s approved backend's file is damaged or missing;
    # none refuses: what serves is what the parity gate approved.
    fallback_backend: str = "none"  # none | fp32 | torch
    require_digests: bool = False  # refuse a model saved before digests were recorded

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"predict.backend: must be one of {', '.join(BACKENDS)}")
        if self.fallback_backend not in FALLBACK_BACKENDS:
            raise ConfigError(
                f"predict.fallback_backend: must be one of {', '.join(FALLBACK_BACKENDS)}"
            )
        if min(self.batch_size, self.max_image_bytes, self.max_image_pixels) < 1:
            raise ConfigError("predict: batch_size and limits must be >= 1")


@dataclass(frozen=True)
class StreamConfig:
    """The Kafka consumer (`mmops serve`); brokers and credentials come from the environment."""

    input_topic: str = "mmops.events"
    output_topic: str = "mmops.predictions"
    dead_letter_topic: str = "mmops.events.dlq"
    group_id: str = "mmops-serve"
    partitions: int = 2  # topics `mmops up` creates; consumers in one group scale up to this
    # A micro-batch closes at max_batch events or max_wait_ms after its first event.
    max_batch: int = 64
    max_wait_ms: int = 50
    # ... or at max_batch_bytes of raw events (one larger event still makes a batch of one).
    # The fetch size follows it, so raw bytes in hand stay under about (workers + 2) times this.
    max_batch_bytes: int = 32_000_000
    # Batches predicted at once, at most one per partition; each gets cores/workers ONNX Runtime
    # threads unless predict.threads says otherwise.
    workers: int = 2
    max_event_bytes: int = 16_000_000  # an event's raw value; base64 images are ~4/3 their bytes
    max_id_chars: int = 1024  # an event's id is its prediction's key; longer ids are dead-lettered
    model_poll_s: float = 10.0  # how often to look for a new champion
    # How long the group waits for a dead consumer before giving its partitions to another.
    session_timeout_ms: int = 10_000
    auto_offset_reset: str = "earliest"  # where a new group starts: earliest | latest
    metrics_port: int = 9108  # Prometheus /metrics and the liveness probe /healthz; 0 disables
    # /healthz fails once the serving loop or a batch's prediction is stuck this long, or events
    # wait and none has been acknowledged for this long.
    liveness_timeout_s: float = 120.0
    # A Kafka request's deadline; a client failing for 3x this without a success is rebuilt.
    client_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        sizes = (self.partitions, self.max_batch, self.workers, self.max_event_bytes)
        if min(*sizes, self.max_id_chars, self.max_batch_bytes) < 1:
            raise ConfigError(
                "stream: partitions, max_batch, max_batch_bytes, workers, max_event_bytes and "
                "max_id_chars must be >= 1"
            )
        if self.max_wait_ms < 0 or min(self.model_poll_s, self.liveness_timeout_s) <= 0:
            raise ConfigError(
                "stream: max_wait_ms must be >= 0, model_poll_s and liveness_timeout_s > 0"
            )
        if self.client_timeout_s < 1:
            raise ConfigError("stream.client_timeout_s: must be >= 1 (seconds)")
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ConfigError("stream.auto_offset_reset: must be earliest or latest")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError("stream.metrics_port: must be a port number (0 disables)")
        if len({self.input_topic, self.output_topic, self.dead_letter_topic}) < 3:
            raise ConfigError("stream: input, output and dead-letter topics must differ")


@dataclass(frozen=True)
class DriftConfig:
    """Drift monitoring of live events (`mmops serve`) against the served version's reference."""

    enabled: bool = True
    # Held-out embeddings (validation and test splits) stored with each exported model.
    reference_size: int = 2000
    window: int = 200  # live events each test compares with the reference
    # Expected events between two false alarms of the whole monitor: n signals, each n x this.
    ert: int = 20_000
    streams: int = 300  # simulated streams that calibrate each threshold
    horizon: int = 1000  # events per simulated stream after its window fills
    seed: int = 0
    topic: str = "mmops.drift"  # drift events, JSON
    # Rolling figures against the reference: predicted labels, confidence, dead letters, accuracy.
    rolling_events: int = 1000
    queue_batches: int = 64  # batches waiting for the monitor; more are dropped and counted
    # Share of wall time the monitor's thread may compute: a saturated consumer's monitor then
    # watches a sample of the batches (the rest are counted as skipped) instead of slowing it.
    max_busy_share: float = 0.02

    def __post_init__(self) -> None:
        if self.window < 10 or self.reference_size < 20:
            raise ConfigError("drift: window must be >= 10 and reference_size >= 20")
        if min(self.ert, self.streams, self.horizon, self.rolling_events) < 1:
            raise ConfigError("drift: ert, streams, horizon and rolling_events must be >= 1")
        if self.queue_batches < 1:
            raise ConfigError("drift.queue_batches: must be >= 1")
        if not 0 < self.max_busy_share <= 1:
            raise ConfigError("drift.max_busy_share: must be in (0, 1]")


@dataclass(frozen=True)
class FeedbackConfig:
    """Labels from production (`mmops feedback`): joined to their events, a new data version."""

    topic: str = "mmops.feedback"  # late labels: JSON {"id": ..., "label": ...} keyed by event id
    label_field: str = "label"  # an event's own label, when it arrives labelled
    out_dir: str = "data/feedback"  # where labelled snapshots are written, one folder each
    merged_dir: str = "data/merged"  # the current data plus feedback: what the next retrain reads
    split: str = "train"  # the split feedback rows join; val and test stay as they are
    min_rows: int = 1  # fewer labelled events than this: no snapshot
    timeout_s: float = 30.0  # reading the topics stops once nothing new arrives for this long

    def __post_init__(self) -> None:
        if self.split not in ("train", "val", "test"):
            raise ConfigError("feedback.split: must be train, val or test")
        if self.min_rows < 1 or self.timeout_s <= 0:
            raise ConfigError("feedback: min_rows must be >= 1 and timeout_s > 0")


@dataclass(frozen=True)
class TriggerConfig:
    """Retrains that start themselves: a drift alarm runs the retrain flow's deployment."""

    enabled: bool = False  # `mmops serve` starts runs only when this is on
    deployment: str = "retrain_and_evaluate/monthly"  # FLOW/DEPLOYMENT, as `mmops schedule` serves
    cooldown_s: float = 86_400.0  # at most one drift-started run per this many seconds
    tag: str = "drift"  # the flow run's tag

    def __post_init__(self) -> None:
        if self.cooldown_s < 0:
            raise ConfigError("trigger.cooldown_s: must be >= 0")
        if "/" not in self.deployment:
            raise ConfigError(
                "trigger.deployment: must be FLOW/DEPLOYMENT, e.g. retrain_and_evaluate/monthly"
            )


@dataclass(frozen=True)
class GateConfig:
    """When a challenger may replace the champion, measured on the current test split."""

    # Floors every candidate must clear, champion or not.
    min_accuracy: float = 0.8
    max_group_gap: float = 0.25  # largest accuracy gap between `group` values
    max_latency_ms: float = 500.0  # p50 of one batch of 32 on the serving backend
    # No regression against the champion beyond these (0.01 = 1 point), overall and per group.
    max_regression: float = 0.01
    max_group_regression: float = 0.05
    # Also require the challenger to be significantly better (McNemar's exact test).
    require_significance: bool = False
    significance_level: float = 0.05
    # The challenger must beat the classical baseline's test accuracy by this (0.01 = 1 point).
    min_gain_over_baseline: float = 0.0

    def __post_init__(self) -> None:
        for name in ("min_accuracy", "max_group_gap", "max_regression", "max_group_regression"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"gate.{name}: must be between 0 and 1")
        if not 0.0 < self.significance_level < 1.0:
            raise ConfigError("gate.significance_level: must be between 0 and 1")


@dataclass(frozen=True)
class ScheduleConfig:
    """The retrain flow's deployment: `mmops schedule` serves it, infra/prefect.yaml declares it."""

    name: str = "monthly"
    cron: str = "0 3 1 * *"  # 03:00 on the first of every month
    timezone: str = "UTC"


@dataclass(frozen=True)
class TrackingConfig:
    """Names in MLflow and how long to wait on its server; the URI is MLFLOW_TRACKING_URI's."""

    experiment: str = "mmops"
    registered_model: str = "mmops-classifier"
    # One call to a hung server gives up after at most 6 x 20 s + 4 + 8 + 16 + 32 s of backoff
    # + jitter, about 3 minutes (MLflow's own defaults wait about 20); a refused one after the
    # waits alone, about 1 minute: a server restarting within that is waited for. MLflow reads
    # the first three as ints; MLFLOW_HTTP_REQUEST_* set in the environment win over these.
    request_timeout_s: int = 20  # per connect or read of one HTTP request
    max_retries: int = 5
    backoff_factor: int = 2  # seconds; waits 0, 2x, 4x ... between tries
    backoff_jitter: float = 1.0  # up to this many seconds added to each wait
    # `mmops doctor`: a RUNNING run from another host (or reopened) idle this long is orphaned.
    orphan_after_s: int = 6 * 3600

    def __post_init__(self) -> None:
        if self.request_timeout_s < 1:
            raise ConfigError("tracking.request_timeout_s: must be >= 1")
        # MLflow refuses more (_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT, ..._BACKOFF_FACTOR_LIMIT).
        if not 0 <= self.max_retries <= 10:
            raise ConfigError("tracking.max_retries: must be between 0 and 10")
        if not 0 <= self.backoff_factor <= 120:
            raise ConfigError("tracking.backoff_factor: must be between 0 and 120")
        if self.backoff_jitter < 0:
            raise ConfigError("tracking.backoff_jitter: must be >= 0")
        if self.orphan_after_s < 60:
            raise ConfigError("tracking.orphan_after_s: must be >= 60")


@dataclass(frozen=True)
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    demo_data: DemoDataConfig = field(default_factory=DemoDataConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
