"""Peak memory of `mmops serve` on a burst of maximum-size events: batches bounded in bytes
(`stream.max_batch_bytes`) against batches bounded by count only, same events, one run.

Starts its own broker (Tansu) on a free port, produces `--events` events of about `--event-mb`
MB each (a random-noise PNG, the largest image `predict.max_image_bytes` admits, base64 in the
event), then runs `mmops serve --max-events N` as a subprocess per setting and reads its peak
resident memory (VmHWM) from /proc. `idle` is the same consumer on an empty topic: the model and
the clients alone.

Prints one JSON line with the peaks, the ratio bounded/count-only and the bound the README states:

    python bench/stream_memory.py [--model models:/mmops-classifier@champion] [--events 24]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from PIL import Image

from mmops.config import load_params
from mmops.local.stack import LOOPBACK, create_topics, free_port, start_broker

MMOPS = str(Path(sys.executable).parent / "mmops")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/mmops-classifier@champion")
    parser.add_argument("--events", type=int, default=24)
    parser.add_argument("--event-mb", type=float, default=13.0)
    args = parser.parse_args()
    params = load_params("params.yaml" if Path("params.yaml").is_file() else None)
    value = big_event(args.event_mb, params.predict.max_image_bytes)
    settings = {
        "bounded": f"stream.max_batch_bytes={params.stream.max_batch_bytes}",
        "count_only": "stream.max_batch_bytes=1000000000",  # past any batch of 64 here
    }
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        broker = start_broker(port, Path(tmp) / "broker.log")
        servers = f"{LOOPBACK}:{port}"
        try:
            peaks = {"idle": serve_peak(args.model, servers, [], "stream.max_batch=64")}
            for name, setting in settings.items():
                peaks[name] = serve_peak(args.model, servers, [value] * args.events, setting)
        finally:
            broker.kill()
            broker.wait()
    cfg = params.stream
    # Raw events: the batches predicting, the open one, the one sending, one fetch; and per
    # batch predicting about three copies of its bytes (the JSON text, the image bytes, the
    # decoded pixels), as the README states.
    bound = cfg.max_batch_bytes * (cfg.workers + 3 + 3 * cfg.workers)
    print(
        json.dumps(
            {
                "events": args.events,
                "event_mb": round(len(value) / 1e6, 2),
                "burst_mb": round(len(value) * args.events / 1e6, 1),
                "max_batch": cfg.max_batch,
                "max_batch_bytes": cfg.max_batch_bytes,
                "workers": cfg.workers,
                "peak_rss_mb": {k: round(v / 1e6, 1) for k, v in peaks.items()},
                "over_idle_mb": {k: round((peaks[k] - peaks["idle"]) / 1e6, 1) for k in settings},
                "stated_bound_over_idle_mb": round(bound / 1e6, 1),
                "bounded_vs_count_only": round(
                    (peaks["bounded"] - peaks["idle"]) / (peaks["count_only"] - peaks["idle"]), 3
                ),
            }
        )
    )


def big_event(mb: float, max_image_bytes: int) -> bytes:
    """An event of about `mb` MB: a noise PNG just under `max_image_bytes`, base64."""
    png_bytes = min(mb * 1e6 * 3 / 4, max_image_bytes * 0.98)  # noise does not compress
    side = int((png_bytes / 3) ** 0.5)
    image = Image.frombytes("RGB", (side, side), random.Random(0).randbytes(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return json.dumps({"id": "big", "text": "a large image", "image": encoded}).encode()


def serve_peak(model: str, servers: str, values: list[bytes], setting: str) -> int:
    """Peak resident bytes of `mmops serve` until it has handled `values` (or 20 s idle)."""
    from kafka import KafkaProducer

    tag = uuid.uuid4().hex[:6]
    topics = [f"mem-in-{tag}", f"mem-out-{tag}", f"mem-dlq-{tag}"]
    create_topics(servers, topics, 2)
    producer = KafkaProducer(bootstrap_servers=servers, max_request_size=32 << 20)
    for i, value in enumerate(values):
        producer.send(topics[0], value=value.replace(b'"big"', f'"big-{i}"'.encode()))
    producer.flush()
    producer.close()
    overrides = [
        f"stream.input_topic={topics[0]}",
        f"stream.output_topic={topics[1]}",
        f"stream.dead_letter_topic={topics[2]}",
        f"stream.group_id=mem-{tag}",
        "stream.metrics_port=0",
        setting,
    ]
    command = [MMOPS, "serve", "--model", model]
    command += [arg for item in overrides for arg in ("--set", item)]
    if values:
        command += ["--max-events", str(len(values))]
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": servers}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, deadline = 0, time.monotonic() + (20 if not values else 600)
    while process.poll() is None and time.monotonic() < deadline:
        peak = max(peak, _vm_hwm(process.pid))
        time.sleep(0.05)
    if process.poll() is None:
        process.terminate()
    _, err = process.communicate(timeout=60)
    if values and process.returncode != 0:
        raise SystemExit(f"mmops serve failed ({process.returncode}): {err.decode()[-2000:]}")
    return peak


def _vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


if __name__ == "__main__":
    main()
