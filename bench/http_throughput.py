"""`mmops serve-http` under concurrent single-record clients against raw `predict_batch`, one run.

Trains a model with the default model config (few epochs: this times serving, not accuracy) on
demo data and exports it (or takes `--model`, an export folder). On the dataset's records (`id`,
`text`, the image file's bytes) it measures:

- raw: `Predictor.predict_batch` in batches of `serve.max_batch_size` (and of half the
  clients, what a closed loop fills while the other half wait), best of `--rounds`;
- rest / grpc: a `serve-http` subprocess under `--clients` closed-loop clients of one record,
  each its own tritonclient client in its own thread, for `--duration` s after `--warmup` s:
  records/s, p50/p95/p99 latency, the mean batch (`mmops_http_batch_size` over the window).
  Clients run in one process and in two (the client side's GIL); the faster layout is used.
- batch1: the same REST load against a server with `serve.max_batch_size=1`;
- memory: the server's RSS after warm-up; a process loading the model as every Predictor did
  before the lean install (the torch model too, `Predictor.loaded`);
- install size: the dev venv's site-packages against a lean venv of `.[serve]` (built in a
  temporary folder unless `--lean-venv`), which must not import torch; the server's RSS there.

Clients share the machine's cores with the server. Prints one JSON line:

    python bench/http_throughput.py [--model EXPORT] [--rows 2000] [--duration 10]
        [--warmup 2] [--clients 16] [--lean-venv PATH | --skip-install-size] [--set key=value]
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from mmops.config import Params, load_params
from mmops.data.dataset import read_manifest
from mmops.data.demo import make_demo_data
from mmops.local.stack import LOOPBACK, free_port

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
CLIENT_MODULES = {"rest": "tritonclient.http", "grpc": "tritonclient.grpc"}
FAST_TRAIN = ("train.epochs=3", "train.min_steps=0")
# The pre-change serving process: the torch model loaded beside the ONNX runner.
REFERENCE = """
import json, sys, psutil
from pathlib import Path
from bench.http_throughput import dataset_records
from mmops.serving.predictor import Predictor
p = Predictor(sys.argv[1]); p.loaded; p.predict_batch(dataset_records(Path(sys.argv[2]))[:32])
print(json.dumps({"rss": psutil.Process().memory_info().rss}))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an export folder (default: train one)")
    parser.add_argument("--rows", type=int, default=2000, help="demo dataset rows")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="raw predict_batch rounds")
    parser.add_argument("--lean-venv", type=Path, help="an existing venv of .[serve]")
    parser.add_argument("--skip-install-size", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    return parser.parse_args()


def trained_export(work: Path, params_overrides: list[str], rows: int) -> Path:
    """Train on fresh demo data with the default model config and export; the export folder."""
    from mmops.data.validate import validate_dataset
    from mmops.data.validation_report import REPORT_FILE, write_report
    from mmops.export.exporter import export_model
    from mmops.training.train import train

    data = work / "data"
    make_demo_data(data, n=rows)
    overrides = [*FAST_TRAIN, *params_overrides]
    report = validate_dataset(data, load_params(ROOT / "params.yaml", overrides))
    write_report(report, work / "validate")
    if not report.success:
        raise SystemExit("the demo data failed validation")
    overrides.append(f"train.validation_report={work / 'validate' / REPORT_FILE}")
    params = load_params(ROOT / "params.yaml", overrides)
    result = train(data, params, out_dir=work / "train", resume=False, progress=False)
    export_model(result.model_dir, data, params, work / "export")
    return work / "export"


def dataset_records(data: Path) -> list[dict[str, Any]]:
    """The dataset's rows as the server takes them: id, text, the image file's bytes."""
    return [
        {
            "id": str(row["id"]),
            "text": row["text"],
            "image": (data / row["image"]).read_bytes() if row["image"] else None,
        }
        for row in read_manifest(data).to_dict("records")
    ]


def raw_throughput(
    folder: Path, params: Params, records: list[dict], rounds: int, sizes: list[int]
) -> tuple[dict[int, float], str]:
    """Records/s of predict_batch alone at each batch size, the best round; the backend."""
    from mmops.serving.predictor import Predictor

    predictor = Predictor(folder, params.predict.backend, params.predict)
    rates = {}
    for size in sizes:
        predictor.predict_batch(records[:size])  # warm-up
        best = 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            for i in range(0, len(records), size):
                predictor.predict_batch(records[i : i + size])
            best = max(best, len(records) / (time.perf_counter() - start))
        rates[size] = best
    return rates, predictor.backend


@dataclass
class Server:  # a running serve-http: its process, REST and gRPC addresses, model name
    process: subprocess.Popen[bytes]
    http: str
    grpc: str
    model: str


@contextmanager
def serving(venv: Path, folder: Path, overrides: list[str], log: Path) -> Iterator[Server]:
    """A `serve-http` subprocess on free loopback ports, ready; killed on the way out."""
    http_port, grpc_port = free_port(), free_port()
    command = [str(venv / "bin" / "mmops"), "serve-http", "--model", str(folder)]
    command += ["--host", LOOPBACK, "--port", str(http_port), "--grpc-port", str(grpc_port)]
    command += ["--log-format", "text", *(a for o in overrides for a in ("--set", o))]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    server = Server(process, f"{LOOPBACK}:{http_port}", f"{LOOPBACK}:{grpc_port}", folder.name)
    try:
        deadline = time.monotonic() + 120
        while not _ready(server.http):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve-http did not get ready: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ready(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/v2/health/ready", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def batch_histogram(address: str) -> tuple[float, float]:
    """The server's `mmops_http_batch_size` histogram: (sum, count)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        lines = answer.read().decode().splitlines()
    prefix = "mmops_http_batch_size_"
    values = dict(line.rsplit(" ", 1) for line in lines if line.startswith(prefix))
    return float(values[prefix + "sum"]), float(values[prefix + "count"])


def client_process(job: dict[str, Any], barrier: Any, results: Any) -> None:
    """`job["threads"]` closed-loop clients; (end, latency) of each answer, and the CPU used."""
    module = importlib.import_module(CLIENT_MODULES[job["protocol"]])
    samples: list[list[tuple[float, float]]] = [[] for _ in range(job["threads"])]
    errors = [0] * job["threads"]
    barrier.wait()
    stop = time.monotonic() + job["warmup"] + job["duration"]

    def loop(slot: int) -> None:
        client = module.InferenceServerClient(job["address"])
        i = job["first"] + slot
        while time.monotonic() < stop:
            inputs = _inputs(module, job["records"][i % len(job["records"])])
            start = time.monotonic()
            i += job["stride"]
            try:
                client.infer(job["model"], inputs)
            except Exception:  # a 503 or a dropped connection: counted, and the loop goes on
                errors[slot] += 1
                continue
            end = time.monotonic()
            samples[slot].append((end, end - start))

    threads = [threading.Thread(target=loop, args=(s,)) for s in range(job["threads"])]
    for thread in threads:
        thread.start()
    time.sleep(job["warmup"])
    cpu = sum(psutil.Process().cpu_times()[:2])
    time.sleep(max(0.0, stop - time.monotonic()))
    cpu = sum(psutil.Process().cpu_times()[:2]) - cpu  # over the window
    for thread in threads:
        thread.join()
    results.put(([s for mine in samples for s in mine], cpu, sum(errors)))


def _inputs(module: Any, record: dict[str, Any]) -> list[Any]:
    """One record's BYTES tensors; over REST as binary data."""
    columns = [record["id"].encode(), (record["text"] or "").encode(), record["image"] or b""]
    binary = {"binary_data": True} if module.__name__.endswith("http") else {}
    inputs = []
    for name, value in zip(("id", "text", "image"), columns, strict=True):
        tensor = module.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([value], dtype=np.object_), **binary)
        inputs.append(tensor)
    return inputs


def run_load(
    server: Server, protocol: str, records: list[dict], processes: int, args: argparse.Namespace
) -> dict[str, Any]:
    """`args.clients` clients over `processes` processes: throughput, latency, batches, CPU."""
    context = mp.get_context("spawn")  # no fork of this process's threads and runtimes
    barrier, results = context.Barrier(processes + 1), context.Queue()
    threads = args.clients // processes
    address = server.grpc if protocol == "grpc" else server.http
    workers = []
    for p in range(processes):
        job = {"protocol": protocol, "address": address, "model": server.model}
        job |= {"records": records, "threads": threads, "first": p * threads}
        job |= {"stride": args.clients, "warmup": args.warmup, "duration": args.duration}
        workers.append(context.Process(target=client_process, args=(job, barrier, results)))
        workers[-1].start()
    barrier.wait()
    start = time.monotonic() + args.warmup
    server_proc = psutil.Process(server.process.pid)
    time.sleep(args.warmup)
    before, cpu_before = batch_histogram(server.http), sum(server_proc.cpu_times()[:2])
    rss = server_proc.memory_info().rss
    time.sleep(args.duration)
    after, cpu_after = batch_histogram(server.http), sum(server_proc.cpu_times()[:2])
    outcome = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    window = (start, start + args.duration)
    latency = np.array(
        [lat for got, *_ in outcome for end, lat in got if window[0] <= end < window[1]]
    )
    batches = after[1] - before[1]
    cores = os.cpu_count() or 1
    percentiles = np.percentile(latency, [50, 95, 99]) * 1000
    return dict(zip(("p50_ms", "p95_ms", "p99_ms"), percentiles, strict=True)) | {
        "per_s": len(latency) / args.duration,
        "mean_batch": (after[0] - before[0]) / batches if batches else 0.0,
        "server_cpu_share": (cpu_after - cpu_before) / args.duration / cores,
        "client_cpu_share": sum(cpu for _, cpu, _ in outcome) / args.duration / cores,
        "errors": sum(errors for *_, errors in outcome),
        "rss_mb": rss / 2**20,
    }


def reference_rss_mb(folder: Path, data: Path) -> float:
    """RSS of a process loading the model as serving did before: torch model and runner."""
    command = [str(VENV / "bin" / "python"), "-c", REFERENCE, str(folder), str(data)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["rss"] / 2**20


def site_packages_bytes(venv: Path) -> int:
    """Bytes of every file under the venv's site-packages (links not followed)."""
    [site] = (venv / "lib").glob("python3*/site-packages")
    walk = os.walk(site)
    return sum(
        os.lstat(os.path.join(top, name)).st_size for top, _, files in walk for name in files
    )


def lean_venv(path: Path, work: Path) -> Path:
    """A fresh venv with `.[serve]` installed, non-editable, under the tested constraints."""
    # From a copy: setuptools builds in the source tree, and would leave build/ in the checkout.
    source = work / "source"
    for name in ("mmops", "flows"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-cache-dir"]
    pip += ["-c", str(ROOT / "infra" / "constraints.txt"), f"{source}[serve]"]
    subprocess.run(pip, check=True, cwd=work)
    return path


def install_size(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], Path | None]:
    """Site-packages bytes, dev venv vs lean venv, and whether the lean one imports torch."""
    if args.skip_install_size:
        return {}, None
    start = time.perf_counter()
    lean = args.lean_venv or lean_venv(work / "lean-venv", work)
    build_s = time.perf_counter() - start
    probe = [str(lean / "bin" / "python"), "-c", "import torch"]
    imported = subprocess.run(probe, capture_output=True, cwd=tempfile.gettempdir())
    has_torch = imported.returncode == 0
    full, small = site_packages_bytes(VENV), site_packages_bytes(lean)
    figures = {"install_bytes_full": full, "install_bytes_lean": small}
    figures |= {"install_ratio": round(small / full, 4), "lean_has_torch": has_torch}
    figures["lean_build_s"] = round(build_s, 1) if args.lean_venv is None else None
    return figures, lean


def measure_serving(
    folder: Path, records: list[dict], args: argparse.Namespace, log: Path
) -> dict[str, dict[str, Any]]:
    """REST with each client layout and gRPC on the default server; REST on a batch-1 one."""
    loads: dict[str, dict[str, Any]] = {}
    with serving(VENV, folder, args.overrides, log) as server:
        for processes in (1, 2):
            loads[f"rest_{processes}p"] = run_load(server, "rest", records, processes, args)
        processes = 2 if loads["rest_2p"]["per_s"] > loads["rest_1p"]["per_s"] else 1
        loads["rest"] = loads[f"rest_{processes}p"]
        loads["grpc"] = run_load(server, "grpc", records, processes, args)
    one = [*args.overrides, "serve.max_batch_size=1"]
    with serving(VENV, folder, one, log) as server:
        loads["batch1"] = run_load(server, "rest", records, processes, args)
    loads["rest"]["processes"] = processes
    return loads


def main() -> None:
    args = parse_args()
    params = load_params(ROOT / "params.yaml", args.overrides)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmops-http-bench-") as tmp:
        work = Path(tmp)
        if args.model is None:
            folder = trained_export(work, args.overrides, args.rows)
        else:  # any demo data serves as requests
            folder = args.model.resolve()
            make_demo_data(work / "data", n=args.rows)
        setup_s = time.perf_counter() - started
        records = dataset_records(work / "data")
        # At the cap, and at the batch closed-loop clients fill while the other half wait.
        sizes = [params.serve.max_batch_size, max(1, args.clients // 2)]
        raw, backend = raw_throughput(folder, params, records, args.rounds, sizes)
        log = work / "serve.log"
        loads = measure_serving(folder, records, args, log)
        out = figures(args, round(raw[sizes[0]], 1), loads) | {"backend": backend}
        out["raw_per_s_by_batch"] = {str(k): round(v, 1) for k, v in raw.items()}
        out["rss_before_mb"] = round(reference_rss_mb(folder, work / "data"), 1)
        out["rss_ratio"] = round(out["rss_mb"] / out["rss_before_mb"], 3)
        install, lean = install_size(args, work)
        if lean is not None:  # the server as the serving image runs it
            with serving(lean, folder, args.overrides, log) as server:
                lean_load = run_load(server, "rest", records, loads["rest"]["processes"], args)
            install["lean_rss_mb"] = round(lean_load["rss_mb"], 1)
            install[f"lean_rest_{args.clients}_per_s"] = round(lean_load["per_s"], 1)
    out |= install
    out |= {"setup_s": round(setup_s, 1), "total_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(out))


def figures(args: argparse.Namespace, raw: float, loads: dict[str, dict[str, Any]]) -> dict:
    """The JSON's figures and ratios; keys carry the client count (`rest_16_per_s`)."""
    n, rest, batch1 = args.clients, loads["rest"], loads["batch1"]
    out: dict[str, Any] = {"clients": n, "cores": os.cpu_count(), "rows": args.rows}
    out |= {"client_processes": rest["processes"], "duration_s": args.duration, "raw_per_s": raw}
    for name in ("rest", "grpc", "batch1"):
        load = loads[name]
        out[f"{name}_{n}_per_s"] = round(load["per_s"], 1)
        out |= {f"{name}_{n}_{q}_ms": round(load[f"{q}_ms"], 1) for q in ("p50", "p95", "p99")}
        out[f"mean_batch_{name}"] = round(load["mean_batch"], 2)
        out[f"errors_{name}"] = load["errors"]
        # Of all cores: what the server and the clients each took of the machine.
        for side in ("server", "client"):
            out[f"{side}_cpu_share_{name}"] = round(load[f"{side}_cpu_share"], 3)
    out["http_vs_raw"] = round(rest["per_s"] / raw, 3)
    out["grpc_vs_raw"] = round(loads["grpc"]["per_s"] / raw, 3)
    out["batching_gain"] = round(rest["per_s"] / batch1["per_s"], 2)
    out["p95_vs_batch1"] = round(rest["p95_ms"] / batch1["p95_ms"], 3)
    by_layout = {str(p): round(loads[f"rest_{p}p"]["per_s"], 1) for p in (1, 2)}
    out["rest_per_s_by_client_processes"] = by_layout
    out["rss_mb"] = round(rest["rss_mb"], 1)
    return out


if __name__ == "__main__":
    main()
