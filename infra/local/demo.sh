#!/usr/bin/env bash
# The main job end to end on the embedded local defaults: set-up, then the DVC pipeline
# (demo data -> validation -> training -> evaluation -> ONNX/INT8 export), tracked in the local
# MLflow store and pushed to the default local DVC remote, then predictions on the test split.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$root/infra/local/setup.sh"
cd "$root"
export PATH="$root/.venv/bin:$PATH"

dvc repro
dvc push
dvc metrics show
data_dir="$(python -c 'from mmops.config import load_params; print(load_params("params.yaml").data.dir)')"
mmops data-version "$data_dir"
# The one prediction path, on what the export chose to serve.
mmops predict --model models/export --data "$data_dir" \
    --split test --out reports/predict/test.jsonl
echo "validation report: $root/reports/validate/report.html"
echo "evaluation report: $root/reports/evaluate/report.md"
echo "export verdict:    $root/models/export/export.json"
echo "test predictions:  $root/reports/predict/test.jsonl"
echo "MLflow runs:       mlflow ui --backend-store-uri sqlite:///$root/mlflow.db"
