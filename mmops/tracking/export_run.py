"""The export stage tracked in MLflow: ONNX models, the parity verdict and the serving model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from mmops.config.sections import Params
from mmops.export.exporter import export_metrics
from mmops.serving.references import resolve_model
from mmops.tracking.pyfunc import log_pyfunc
from mmops.tracking.runs import configure, write_run_file


def tracked_export(
    model_ref: str, data_dir: Path | str, params: Params, out_dir: Path | str | None = None
) -> tuple[dict[str, Any], str | None, str]:
    """Export and gate; log both ONNX models, the verdict and figures, and the serving model.

    Everything goes to the training run, and the export folder is logged there as a second
    pyfunc model (`serving`), so a registered version carries the artifact it serves with.
    """
    from mmops.data.dataset import load_splits
    from mmops.export.exporter import export_model
    from mmops.serving.runners import EXPORT_FILE, ONNX_FILES

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
        write_run_file(out, run.info.run_id, info.model_uri)
    return report, run.info.run_id, info.model_uri
