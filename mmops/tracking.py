"""MLflow tracking of training and evaluation runs. The training core never imports this module."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from mmops.config import Params, to_dict

RUN_FILE = "mlflow_run.json"
MODEL_ARTIFACT = "model"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in the working directory (a registry needs one)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def configure(params: Params) -> None:
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(params.tracking.experiment)


class MlflowTracker:
    """The training loop's Tracker, writing to the active MLflow run."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


@dataclass(frozen=True)
class TrackedRun:
    run_id: str
    model_uri: str
    model_dir: Path
    result: dict[str, Any]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def tracked_train(
    data_dir: Path | str, params: Params, out_dir: Path | str | None = None, resume: bool = False
) -> TrackedRun:
    """Train inside an MLflow run: params, data version, dataset, per-epoch metrics, the model."""
    from mmops.train import load_splits, train
    from mmops.versioning import data_version

    configure(params)
    version = data_version(data_dir)
    frame = load_splits(data_dir, params)  # a dataset that cannot load leaves no failed run
    with mlflow.start_run(run_name="train", log_system_metrics=True) as run:
        mlflow.log_params(flatten(to_dict(params)))
        mlflow.set_tags(
            {
                "mmops.stage": "train",
                "data.path": str(data_dir),
                "data.md5": version.md5,
                "data.dvc_md5": str(version.dvc_md5),
                "data.tracked_by_dvc": str(version.tracked),
                "git.commit": str(version.git_commit),
                "git.dirty": str(version.git_dirty),
            }
        )
        dataset = mlflow.data.from_pandas(
            frame,
            source=str(Path(data_dir).resolve()),
            name=Path(data_dir).name,
            digest=version.md5[:32],
        )
        mlflow.log_input(dataset, context="training")
        result = train(data_dir, params, out_dir, tracker=MlflowTracker(), resume=resume)
        mlflow.log_metrics(
            {
                "best_val_accuracy": result.best_val_accuracy,
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
                "parameters": result.parameters,
            }
        )
        mlflow.log_dict(result.to_dict(), "train/history.json")
        info = log_pyfunc(result.model_dir, frame, data_dir)
        run_info = {
            "run_id": run.info.run_id,
            "model_uri": info.model_uri,
            "tracking_uri": mlflow.get_tracking_uri(),
        }
        (result.model_dir / RUN_FILE).write_text(json.dumps(run_info, indent=2) + "\n")
    return TrackedRun(run.info.run_id, info.model_uri, result.model_dir, result.to_dict())


def log_pyfunc(
    model_dir: Path, frame: pd.DataFrame, data_dir: Path | str, name: str = MODEL_ARTIFACT
) -> Any:
    """Log the model folder as an MLflow pyfunc with a signature and an input example."""
    from mlflow.models import infer_signature

    import mmops

    rows = frame.head(2)
    example = pd.DataFrame(
        {
            "id": rows["id"].astype(str),
            "text": rows["text"],
            "image": [
                base64.b64encode((Path(data_dir) / p).read_bytes()).decode() for p in rows["image"]
            ],
        }
    )
    model = MmopsPyfunc()
    model.load(model_dir)
    signature = infer_signature(example, model.predict(None, example))
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(mmops.__file__).parent / "pyfunc_model.py"),
        artifacts={"model_dir": str(model_dir)},
        # The package travels with the model, so it loads where mmops is not installed.
        code_paths=[str(Path(mmops.__file__).parent)],
        signature=signature,
        input_example=example,
        pip_requirements=_requirements(),
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    names = (
        "torch",
        "transformers",
        "tokenizers",
        "safetensors",
        "onnxruntime",
        "pillow",
        "pandas",
        "numpy",
        "pyyaml",
        "mlflow",
    )
    return [f"{name}=={version(name)}" for name in names]


class MmopsPyfunc(mlflow.pyfunc.PythonModel):
    """Input: columns id, text, image (base64 PNG/JPEG or a path). Output: label, scores, error.

    A thin frame adapter over `Predictor.predict_batch`, the one prediction path.
    """

    def load_context(self, context: Any) -> None:
        self.load(context.artifacts["model_dir"])

    def load(self, model_dir: Path | str) -> None:
        from mmops.predict import Predictor

        self.predictor = Predictor(model_dir)

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        # pandas holds a missing cell as NaN; a record holds a missing modality as None.
        frame = model_input.astype(object)
        records = frame.where(frame.notna(), None).to_dict("records")
        # Paths are read relative to the working directory: a batch-scoring caller's own files.
        results = self.predictor.predict_batch(records, root=".")
        labels = self.predictor.labels
        return pd.DataFrame(
            {
                "id": [str(r["id"]) for r in results],
                "label": [r.get("label", "") for r in results],
                **{
                    f"score_{label}": [
                        r["scores"][label] if "scores" in r else float("nan") for r in results
                    ]
                    for label in labels
                },
                "error": [r.get("error", "") for r in results],
            }
        )


def model_identity(model_ref: str, run_id: str | None) -> Any:
    """The registered name and version a `models:/` reference points at (else the run)."""
    from mlflow import MlflowClient

    from mmops.predict import ModelIdentity

    if not model_ref.startswith("models:/"):
        return ModelIdentity(model_ref, run_id or "unknown", run_id)
    rest = model_ref.removeprefix("models:/")
    client = MlflowClient(tracking_uri())
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
        return ModelIdentity(name, str(version), run_id)
    name, _, version = rest.partition("/")
    return ModelIdentity(name, version, run_id)


def resolve_model(model_ref: str) -> tuple[Path, str | None]:
    """A local model folder and its MLflow run id, from a folder, runs:/ or models:/ URI."""
    from mmops.model import META_FILE

    local = Path(model_ref)
    if (local / META_FILE).is_file():
        run_file = local / RUN_FILE
        run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
        return local, run_id
    mlflow.set_tracking_uri(tracking_uri())
    run_id = mlflow.models.get_model_info(model_ref).run_id
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_ref))
    folder = next(p.parent for p in downloaded.rglob(META_FILE))
    return folder, run_id


def tracked_evaluate(
    model_ref: str, data_dir: Path | str, params: Params, out_dir: Path | str | None = None
) -> tuple[dict[str, Any], str]:
    """Evaluate and log metrics and the report to the model's training run (or a new run)."""
    from mmops.evaluate import evaluate_model, flat_metrics

    folder, run_id = resolve_model(model_ref)
    configure(params)
    out = Path(out_dir or params.evaluate.out_dir)
    metrics = evaluate_model(folder, data_dir, params, out)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "evaluate") as run:
        mlflow.log_metrics({f"test.{k}": v for k, v in flat_metrics(metrics).items()})
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
        mlflow.set_tag("mmops.evaluated", "true")
    return metrics, run.info.run_id


def tracked_export(
    model_ref: str, data_dir: Path | str, params: Params, out_dir: Path | str | None = None
) -> tuple[dict[str, Any], str | None, str]:
    """Export and gate; log both ONNX models, the verdict and figures, and the serving model.

    Everything goes to the training run, and the export folder is logged there as a second
    pyfunc model (`serving`), so a registered version carries the artifact it serves with.
    """
    from mmops.export import export_model
    from mmops.predict import EXPORT_FILE, ONNX_FILES
    from mmops.train import load_splits

    folder, run_id = resolve_model(model_ref)
    configure(params)
    out = Path(out_dir or params.export.out_dir)
    report = export_model(folder, data_dir, params, out)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "export") as run:
        mlflow.log_metrics(export_metrics(report))
        mlflow.set_tags(
            {
                "export.serving": report["serving"],
                "export.int8_passed": str(report["gates"]["int8"]["passed"]),
                "export.int8_reasons": "; ".join(report["gates"]["int8"]["reasons"]) or "none",
            }
        )
        mlflow.log_artifact(str(out / EXPORT_FILE), artifact_path="export")
        for name in ONNX_FILES.values():
            mlflow.log_artifact(str(out / name), artifact_path="export")
        frame = load_splits(data_dir, params)
        info = log_pyfunc(out, frame, data_dir, name="serving")
        run_info = {
            "run_id": run.info.run_id,
            "model_uri": info.model_uri,
            "tracking_uri": mlflow.get_tracking_uri(),
        }
        (out / RUN_FILE).write_text(json.dumps(run_info, indent=2) + "\n")
    return report, run.info.run_id, info.model_uri


def export_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The export report as flat numbers, for MLflow and `dvc metrics`."""
    flat: dict[str, float] = {
        f"export.accuracy.{name}": value for name, value in report["accuracy"].items()
    }
    flat.update({f"export.size_bytes.{k}": v for k, v in report["size_bytes"].items()})
    flat["export.size_ratio_int8_vs_fp32"] = report["size_ratio_int8_vs_fp32"]
    for name, gate in report["gates"].items():
        flat[f"export.{name}.passed"] = float(gate["passed"])
        flat[f"export.{name}.agreement"] = gate["agreement"]
        flat[f"export.{name}.accuracy_drop"] = gate["accuracy_drop"]
    for name, by_size in report["latency"].items():
        for size, figures in by_size.items():
            flat[f"export.latency.{name}.bs{size}.p50_ms"] = figures["p50_ms"]
    return flat
