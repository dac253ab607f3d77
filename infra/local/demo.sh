#!/usr/bin/env bash
# The main job end to end on the embedded local defaults: set-up; the demo dataset as a DVC
# data version, validated and pushed to the default local remote; then the Prefect flow
# `retrain_and_evaluate` (validate -> train -> evaluate -> ONNX/INT8 export -> register in the
# local MLflow registry -> gate -> promote), predictions on the test split by the champion, and
# live predictions: the local broker, the Kafka consumer following the champion, and the test
# split sent through it as events.
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

# Live: broker + MLflow server on loopback, the consumer in the background, the events through it.
mmops up
mkdir -p .mmops/logs
mmops serve > .mmops/logs/serve.log 2>&1 &
serve_pid=$!
stop_stack() {
  kill -TERM "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null || true
  mmops down
}
trap stop_stack EXIT
# Events sent before the consumer has joined its group would wait for it: let it join first.
for _ in $(seq 240); do
  grep -q '"partitions assigned"' .mmops/logs/serve.log && break
  kill -0 "$serve_pid" 2>/dev/null || { cat .mmops/logs/serve.log; exit 1; }
  sleep 0.5
done
grep -q '"partitions assigned"' .mmops/logs/serve.log || {
  cat .mmops/logs/serve.log; echo "mmops serve did not join its consumer group in 120 s" >&2; exit 1; }
mmops stream-demo --data "$data_dir" --split test --report .mmops/stream-demo.json
stop_stack
trap - EXIT

echo
mmops summary --stream-report .mmops/stream-demo.json
echo
echo "Where to look:"
echo "  MLflow UI:     mmops up, then http://127.0.0.1:5000 (mmops down stops it),"
echo "                 or: mlflow ui --backend-store-uri sqlite:///mlflow.db"
# Without PREFECT_API_URL each flow run starts a temporary API on Prefect's local database, which
# `prefect server start` serves too: the UI shows the runs of this demo.
echo "  Prefect UI:    prefect server start, then http://127.0.0.1:4200 (flow runs and the"
echo "                 'retrain-summary' artifact; stored in ${PREFECT_HOME:-$HOME/.prefect}/prefect.db)"
runs=("$root"/runs/*/)  # one folder per `mmops retrain`, named by UTC time: the last is ours
echo "  evaluation:    ${runs[-1]}evaluate/ (report.md, metrics.json, plots)"
echo "  predictions:   $root/reports/predict/test.jsonl"
echo "  consumer log:  $root/.mmops/logs/serve.log (one JSON object per line)"
echo "  stream report: $root/.mmops/stream-demo.json"
