#!/usr/bin/env bash
# The main job end to end on the embedded local defaults: set-up, then the DVC pipeline
# (demo data -> validation -> training -> evaluation), tracked in the local MLflow store and
# pushed to the default local DVC remote.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$root/infra/local/setup.sh"
cd "$root"
export PATH="$root/.venv/bin:$PATH"

dvc repro
dvc push
dvc metrics show
mmops data-version "$(python -c 'from mmops.config import load_params; print(load_params("params.yaml").data.dir)')"
echo "validation report: $root/reports/validate/report.html"
echo "evaluation report: $root/reports/evaluate/report.md"
echo "MLflow runs:       mlflow ui --backend-store-uri sqlite:///$root/mlflow.db"
