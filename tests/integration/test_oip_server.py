"""`mmops serve-http` against tritonclient, the standard v2 client: REST and gRPC conformance,
errors, batching across concurrent requests, and a champion swap under load."""

from __future__ import annotations

import base64
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from mmops.config import load_params
from mmops.data.dataset import read_manifest
from mmops.local.stack import LOOPBACK, free_port
from mmops.serving.oip.server import OipServer
from mmops.serving.predictor import Predictor
from mmops.tracking import registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "mmops-oip-test"


@pytest.fixture(scope="module")
def store(
    train_and_export: Callable[..., tuple[str, dict[str, str]]],
    tmp_path_factory: pytest.TempPathFactory,
    mlflow_store: Callable[..., AbstractContextManager[str]],
) -> Iterator[dict[str, Any]]:
    """Two tiny models exported and registered (versions 1 and 2), 1 the champion."""
    workdir = tmp_path_factory.mktemp("oip")
    with mlflow_store(workdir):
        _, exported = train_and_export("train.epochs=2")
        _, second = train_and_export("train.epochs=1")
        registry.register(exported["model_uri"], MODEL, {})
        registry.register(second["model_uri"], MODEL, {})
        registry.promote(MODEL, "1", "first champion")
        yield {"uri": exported["model_uri"]}


@pytest.fixture(scope="module")
def records(demo_dir: Path) -> list[dict[str, Any]]:
    rows = read_manifest(demo_dir).head(24).to_dict("records")
    return [
        {
            "id": str(row["id"]),
            "text": row["text"] if isinstance(row["text"], str) else None,
            "image": (demo_dir / row["image"]).read_bytes()
            if isinstance(row["image"], str)
            else None,
        }
        for row in rows
    ]


@pytest.fixture(scope="module")
def server(store: dict[str, Any]) -> Iterator[dict[str, Any]]:
    params = load_params(
        None,
        ["serve.model_poll_s=0.5", "serve.max_body_bytes=3000000", "serve.max_wait_ms=20"],
    )
    oip = OipServer(params, f"models:/{MODEL}@champion")
    http_port, grpc_port = free_port(), free_port()
    thread = threading.Thread(target=oip.run, args=(LOOPBACK, http_port, grpc_port), daemon=True)
    thread.start()
    url = f"{LOOPBACK}:{http_port}"
    deadline = time.monotonic() + 60
    while not _ready(url):
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.2)
    yield {"server": oip, "http": url, "grpc": f"{LOOPBACK}:{grpc_port}"}
    oip.stop()
    thread.join(timeout=20)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _inputs(module: Any, records: list[dict[str, Any]], binary: bool = True) -> list[Any]:
    columns = {
        "id": [r["id"].encode() for r in records],
        "text": [(r["text"] or "").encode() for r in records],
        "image": [r["image"] or b"" for r in records],
    }
    if not binary:  # JSON carries images as base64 text
        columns["image"] = [base64.b64encode(value) for value in columns["image"]]
    inputs = []
    for name, values in columns.items():
        tensor = module.InferInput(name, [len(values)], "BYTES")
        array = np.array(values, dtype=np.object_)
        if module is httpclient:
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _expected(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    predictor = Predictor.load(f"models:/{MODEL}/1")
    return predictor.predict_batch(records)


def _text(value: bytes | str) -> str:
    """A BYTES element: bytes from binary data, str from JSON (tritonclient's as_numpy)."""
    return value.decode() if isinstance(value, bytes) else value


def _check(result: Any, expected: list[dict[str, Any]], labels: list[str]) -> None:
    got_labels = [_text(label) for label in result.as_numpy("label")]
    assert got_labels == [e["label"] for e in expected]
    scores = result.as_numpy("scores")
    want = np.array([[e["scores"][label] for label in labels] for e in expected])
    np.testing.assert_allclose(scores, want, atol=1e-6)
    assert {_text(v) for v in result.as_numpy("model_version")} == {"1"}


def test_rest_health_metadata_and_inference_match_the_predictor(
    server: dict[str, Any], records: list[dict[str, Any]]
) -> None:
    client = httpclient.InferenceServerClient(server["http"])
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("another-model")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata(MODEL)
    assert metadata["versions"] == ["1"]
    assert [t["name"] for t in metadata["inputs"]] == ["id", "text", "image"]
    labels = metadata["parameters"]["labels"]
    assert metadata["outputs"][1] == {
        "name": "scores",
        "datatype": "FP32",
        "shape": [-1, len(labels)],
    }
    expected = _expected(records)
    _check(client.infer(MODEL, _inputs(httpclient, records)), expected, labels)
    # JSON without the binary extension, images base64; outputs asked for as JSON too
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=False)
        for n in ("label", "scores", "model_version")
    ]
    json_result = client.infer(MODEL, _inputs(httpclient, records, binary=False), outputs=outputs)
    _check(json_result, expected, labels)
    # the version route, and a request of one record (INT8's activation ranges follow the batch,
    # so a record's scores are compared with the predictor's on the same batch)
    one = client.infer(MODEL, _inputs(httpclient, records[:1]), model_version="1")
    _check(one, _expected(records[:1]), labels)


def test_grpc_health_metadata_and_inference_match_the_predictor(
    server: dict[str, Any], records: list[dict[str, Any]]
) -> None:
    client = grpcclient.InferenceServerClient(server["grpc"])
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert not client.is_model_ready(MODEL, "7")
    metadata = client.get_model_metadata(MODEL, as_json=True)
    assert metadata["versions"] == ["1"] and metadata["inputs"][2]["name"] == "image"
    labels = httpclient.InferenceServerClient(server["http"]).get_model_metadata(MODEL)[
        "parameters"
    ]["labels"]
    _check(client.infer(MODEL, _inputs(grpcclient, records)), _expected(records), labels)
    with pytest.raises(InferenceServerException, match="not served"):
        client.infer("another-model", _inputs(grpcclient, records[:2]))
    bad = grpcclient.InferInput("image", [1], "FP32")
    bad.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    with pytest.raises(InferenceServerException, match=r"inputs\.image\.datatype: expected BYTES"):
        client.infer(MODEL, [bad])


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, body, headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _declare_body(address: str, path: str, length: int) -> tuple[int, bytes]:
    """Send only the headers of a request declaring a `length`-byte body; the answer."""
    import http.client

    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", path)
    connection.putheader("Content-Length", str(length))
    connection.endheaders()
    response = connection.getresponse()
    status, body = response.status, response.read()
    connection.close()
    return status, body


def test_bad_requests_get_a_4xx_naming_the_field_and_paths_are_never_read(
    server: dict[str, Any], records: list[dict[str, Any]], tmp_path: Path
) -> None:
    client = httpclient.InferenceServerClient(server["http"])
    secret = tmp_path / "secret.png"
    secret.write_bytes(records[0]["image"])  # a real image: read, it would predict
    for image, binary in (
        (str(secret).encode(), True),
        (str(secret).encode(), False),
        (b"file:///etc/passwd", True),
        (b"https://example.com/a.png", True),
    ):
        tensor = httpclient.InferInput("image", [1], "BYTES")
        # over JSON, the path as text (not base64): refused by name either way
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=binary)
        with pytest.raises(
            InferenceServerException, match=r"inputs\.image\[0\]: a path or URL is refused"
        ):
            client.infer(MODEL, [tensor])
    garbage = _inputs(httpclient, [records[0], {**records[1], "image": b"not an image at all"}])
    with pytest.raises(InferenceServerException, match=r"inputs\.image\[1\]: cannot decode"):
        client.infer(MODEL, garbage)
    with pytest.raises(InferenceServerException, match="not served"):
        client.infer("another-model", _inputs(httpclient, records[:1]))
    url = f"http://{server['http']}/v2/models/{MODEL}/infer"
    status, body = _declare_body(server["http"], f"/v2/models/{MODEL}/infer", 3_000_001)
    assert status == 413 and b"serve.max_body_bytes" in body  # refused before it is sent
    status, body = _post(
        url, b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}'
    )
    assert status == 400 and b"inputs.text" in body
    status, body = _post(url, b"\xff\xfe not json")
    assert status == 400 and b"error" in body
    status, _ = _post(f"http://{server['http']}/v2/models/{MODEL}/versions/9/infer", b"{}")
    assert status == 404


def test_the_plain_json_route_takes_predict_batch_records(
    server: dict[str, Any], records: list[dict[str, Any]]
) -> None:
    import orjson

    sent = [
        {**r, "image": base64.b64encode(r["image"]).decode() if r["image"] else None}
        for r in records[:4]
    ]
    sent.append({"id": "path", "image": "images/0.png"})
    status, body = _post(f"http://{server['http']}/predict", orjson.dumps({"records": sent}))
    assert status == 200
    results = orjson.loads(body)["predictions"]
    assert [r["label"] for r in results[:4]] == [e["label"] for e in _expected(records[:4])]
    assert "not base64" in results[4]["error"]


def test_concurrent_requests_are_batched_and_metrics_show_it(
    server: dict[str, Any], records: list[dict[str, Any]]
) -> None:
    oip: OipServer = server["server"]
    before = oip.service.batcher.stats.batches

    def one(i: int) -> str:
        client = httpclient.InferenceServerClient(server["http"])
        result = client.infer(MODEL, _inputs(httpclient, [records[i % len(records)]]))
        return _text(result.as_numpy("label")[0])

    with ThreadPoolExecutor(16) as pool:
        labels = list(pool.map(one, range(160)))
    assert len(labels) == 160
    stats = oip.service.batcher.stats
    assert stats.batches - before < 160  # requests shared batches
    assert max(stats.sizes) > 1
    with urllib.request.urlopen(f"http://{server['http']}/metrics") as response:
        page = response.read().decode()
    assert 'mmops_http_requests_total{code="200",protocol="rest"}' in page
    assert "mmops_http_batch_size_bucket" in page and 'version="1"' in page


def test_a_champion_swap_mid_load_serves_every_request_by_exactly_one_version(
    server: dict[str, Any], records: list[dict[str, Any]]
) -> None:
    stop = threading.Event()
    seen: list[list[str]] = []
    errors: list[BaseException] = []

    def client_loop(protocol: Any, address: str) -> None:
        client = protocol.InferenceServerClient(address)
        mine: list[str] = []
        while not stop.is_set():
            try:
                result = client.infer(MODEL, _inputs(protocol, records[:3]))
            except BaseException as error:
                errors.append(error)
                return
            versions = {_text(v) for v in result.as_numpy("model_version")}
            assert len(versions) == 1, versions  # one request, one version
            mine.append(versions.pop())
        seen.append(mine)

    threads = [
        threading.Thread(target=client_loop, args=(module, server[key]))
        for module, key in [(httpclient, "http"), (grpcclient, "grpc")] * 4
    ]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    registry.promote(MODEL, "2", "second champion")
    deadline = time.monotonic() + 30
    while server["server"].service.version != "2":
        assert time.monotonic() < deadline, "the new champion was not swapped in"
        time.sleep(0.2)
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors[:3]
    assert len(seen) == len(threads)
    for versions in seen:
        assert versions and versions[-1] == "2"
        # never back: once a client saw version 2, it saw nothing else
        assert versions == sorted(versions), versions
    assert any("1" in versions for versions in seen)
    registry.promote(MODEL, "1", "back")
