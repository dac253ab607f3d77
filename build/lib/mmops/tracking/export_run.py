"""The export stage tracked in MLflow: ONNX models, the parity verdict and the serving model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from mmops.config import Params
from mmops.export.records import ExportReport, export_metrics
from mmops.serving.references import resolve_model
from mmops.tracking.pyfunc import log_pyfunc
from mmops.tracking.runs import configure, standalone_run_name, write_run_file


def tracked_export(
    model_ref: str, data_dir: Path | str, params: Params, out_dir: Path | str | None = None
) -> tuple[ExportReport, str | None, str]:
    """Export and gate; log both ONNX models, the verdict and figures, and the serving model.

    Everything goes to the training run, and the export folder is logged there as a second
    pyfunc model (`serving`), so a registered version carries the artifact it serves with.
    """
    from mmops.data.dataset import load_splits
    from mmops.export.exporter import export_model
    from mmops.serving.runners import EXPORT_FILE, ONNX_FILES

    configure(params)
    out = Path(out_dir or params.export.out_dir)
    with tempfile.TemporaryDirectory(prefix="mmops-model-") as download:  # no leftovers
        folder, run_id = resolve_model(model_ref, Path(download))
        report = export_model(folder, data_dir, params, out)
    name = None if run_id else standalone_run_name("export", data_dir)
    with mlflow.start_run(run_id=run_id, run_name=name) as run:
        mlflow.set_tags(
            {
                "export.serving": report.serving,
                "export.int8_passed": str(report.gates.int8.passed),
                "export.int8_reasons": "; ".join(report.gates.int8.reasons) or "none",
            }
        )
        mlflow.log_artifact(str(out / EXPORT_FILE), artifact_path="export")
        for name in ONNX_FILES.values():
            mlflow.log_artifact(str(out / name), artifact_path="export")
        frame = load_splits(data_dir, params)
        info = log_pyfunc(out, frame, data_dir, name="serving")
        # Linked to the serving model, the one a registered version points at.
        mlflow.log_metrics(export_metrics(report), model_id=info.model_id)
        write_run_file(out, run.info.run_id, info.model_uri, info.model_id)
    return report, run.info.run_id, info.model_uri
