#!/usr/bin/env bash
# The main job end to end on the embedded local defaults: set-up; the demo dataset as a DVC
# data version, validated and pushed to the default local remote; then the Prefect flow
# `retrain_and_evaluate` (validate -> train -> evaluate -> ONNX/INT8 export -> register in the
# local MLflow registry -> gate -> promote), and predictions on the test split by the champion.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$root/infra/local/setup.sh"
cd "$root"
export PATH="$root/.venv/bin:$PATH"

data_dir="$(python -c 'from mmops.config import load_params; print(load_params("params.yaml").data.dir)')"
model="$(python -c 'from mmops.config import load_params; print(load_params("params.yaml").tracking.registered_model)')"

dvc repro validate          # demo data -> validation; dvc.lock records the data version
dvc push
mmops data-version "$data_dir"
mmops retrain --data "$data_dir"
mmops models
# The one prediction path, with whichever version is champion now.
mmops predict --model "models:/$model@champion" --data "$data_dir" --split test \
    --out reports/predict/test.jsonl
echo "test predictions:  $root/reports/predict/test.jsonl"
echo "flow runs:         the Prefect artifact 'retrain-summary' (prefect server start to browse)"
echo "MLflow runs:       mlflow ui --backend-store-uri sqlite:///$root/mlflow.db"
