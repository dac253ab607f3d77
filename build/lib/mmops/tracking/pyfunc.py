"""The model as an MLflow pyfunc: a thin frame adapter over the one prediction path.

Logged "from code" (pyfunc_entry.py), so no pickled object is stored.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

MODEL_ARTIFACT = "model"


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
        python_model=str(Path(mmops.__file__).parent / "tracking" / "pyfunc_entry.py"),
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
    """Input: columns id, text, image (PNG/JPEG bytes or base64). Output: label, scores, error.

    A thin frame adapter over `Predictor.predict_batch`, the one prediction path. An image given
    as a file path is an error for that row: behind `mlflow models serve`, a path would let any
    caller read image files off the server.
    """

    def load_context(self, context: Any) -> None:
        self.load(context.artifacts["model_dir"])

    def load(self, model_dir: Path | str) -> None:
        from mmops.serving.predictor import Predictor

        self.predictor = Predictor(model_dir)

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        # pandas holds a missing cell as NaN; a record holds a missing modality as None.
        frame = model_input.astype(object)
        records = frame.where(frame.notna(), None).to_dict("records")
        # No root: paths are refused, as for the stream's events.
        results = self.predictor.predict_batch(records)
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
