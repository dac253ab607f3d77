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
        frame = load_splits(data_dir, params)
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


def log_pyfunc(model_dir: Path, frame: pd.DataFrame, data_dir: Path | str) -> Any:
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
        name=MODEL_ARTIFACT,
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
        "pillow",
        "pandas",
        "numpy",
        "pyyaml",
        "mlflow",
    )
    return [f"{name}=={version(name)}" for name in names]


class MmopsPyfunc(mlflow.pyfunc.PythonModel):
    """Input: columns id, text, image (base64 PNG/JPEG or a path). Output: label and scores."""

    def load_context(self, context: Any) -> None:
        self.load(context.artifacts["model_dir"])

    def load(self, model_dir: Path | str) -> None:
        from mmops.model import load_model

        self.loaded = load_model(model_dir)

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        import torch

        from mmops.preprocess import Collator, Example, image_tensor, model_inputs, open_image

        loaded = self.loaded
        config = loaded.model.config
        examples = []
        for image, text in zip(model_input["image"], model_input["text"], strict=True):
            pixels = None
            if isinstance(image, str) and image:
                source = (
                    image
                    if Path(image).suffix.lower() in (".png", ".jpg", ".jpeg")
                    else (base64.b64decode(image))
                )
                pixels = image_tensor(open_image(source), config.image_size)
            examples.append(Example(pixels, text if isinstance(text, str) else None, -1))
        batch = Collator(loaded.tokenizer, config.image_size, config.max_text_length)(examples)
        with torch.no_grad():
            probs = loaded.model(**model_inputs(batch, torch.device("cpu"))).logits.softmax(-1)
        out = pd.DataFrame(probs.numpy(), columns=[f"score_{label}" for label in loaded.labels])
        out.insert(0, "label", [loaded.labels[i] for i in probs.argmax(-1).tolist()])
        return out


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
