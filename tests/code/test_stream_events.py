"""The event contract of the stream consumer: decoding, outputs, dead letters, settings."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mmops.config import ConfigError, PredictConfig, load_params
from mmops.local.stack import StackError, loopback_port
from mmops.model.image_processing import ImageSpec
from mmops.serving.champion import ModelSource
from mmops.serving.predictor import Predictor
from mmops.serving.references import ModelIdentity
from mmops.serving.runners import Outputs
from mmops.stream.events import (
    EventError,
    dead_letter,
    dead_letter_headers,
    decode_event,
    prediction_value,
)
from mmops.stream.server import serving_threads
from mmops.stream.settings import kafka_settings

GOOD = {"id": "e1", "text": "a red circle", "image": "aGVsbG8=", "ts": 5, "source": "cam-1"}


def encode(value: object) -> bytes:
    return json.dumps(value).encode()


def test_a_good_event_decodes_to_its_fields() -> None:
    assert decode_event(encode(GOOD), 1000) == GOOD


def test_null_modalities_are_allowed_when_declared() -> None:
    event = {"id": "e1", "text": None, "image": "aGVsbG8="}
    assert decode_event(encode(event), 1000) == event


@pytest.mark.parametrize(
    ("value", "reason", "names"),
    [
        (None, "null_value", "value: null"),
        (b"x" * 1001, "event_too_large", "stream.max_event_bytes"),
        (b"\xff\xfe{}", "not_utf8", "value: not UTF-8"),
        (b"{not json", "not_json", "value: not JSON"),
        (encode([GOOD]), "not_object", "got list"),
        (encode("just text"), "not_object", "got str"),
        (encode({"text": "t", "image": None}), "missing_field", "id: missing"),
        (encode({**GOOD, "id": None}), "missing_field", "id: missing"),
        (encode({**GOOD, "id": 7}), "wrong_type", "id: expected a non-empty string"),
        (encode({**GOOD, "id": ""}), "wrong_type", "id: expected a non-empty string"),
        (encode({"id": "e1", "image": None}), "missing_field", "text: missing"),
        (encode({"id": "e1", "text": "t"}), "missing_field", "image: missing"),
        (encode({**GOOD, "image": [1, 2]}), "wrong_type", "image: expected base64"),
        (encode({**GOOD, "id": "x" * 65}), "id_too_long", "stream.max_id_chars"),
    ],
)
def test_bad_events_name_what_is_wrong(value: bytes | None, reason: str, names: str) -> None:
    with pytest.raises(EventError, match=names) as caught:
        decode_event(value, 1000, max_id_chars=64)
    assert caught.value.reason == reason


def test_prediction_passes_extra_fields_through_without_clobbering_its_own() -> None:
    result = {"id": "e1", "label": "red", "scores": {"red": 0.9}, "model": "m", "version": "3"}
    value = prediction_value(GOOD, result, received=100.0, now=100.25)
    assert value["model"] == {"name": "m", "version": "3"}
    assert value["latency_ms"] == 250.0
    assert value["ts"] == 100250
    assert value["event_ts"] == 5  # the event's own ts, kept next to the prediction's
    assert value["source"] == "cam-1"
    assert "text" not in value and "image" not in value


def test_dead_letter_headers_keep_the_original_and_say_where_from() -> None:
    message = SimpleNamespace(
        topic="in", partition=1, offset=42, timestamp=7, headers=[("trace", b"abc")]
    )
    headers = dict(dead_letter_headers(message, "not_json", "value: not JSON"))
    assert headers["trace"] == b"abc"
    assert headers["mmops.error.reason"] == b"not_json"
    assert headers["mmops.error.message"] == b"value: not JSON"
    assert headers["mmops.source.topic"] == b"in"
    assert headers["mmops.source.partition"] == b"1"
    assert headers["mmops.source.offset"] == b"42"


def test_dead_letter_headers_are_always_valid_producer_headers() -> None:
    message = SimpleNamespace(
        topic="in",
        partition=0,
        offset=3,
        timestamp=7,
        headers=[("null", None), (b"\xffkey", b"v"), ("text", "t"), ("mmops.source.topic", b"x")],
    )
    headers = dead_letter_headers(message, "not_json", "e" * 5000)
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers)
    found = dict(headers)
    assert found["null"] == b"" and found["\ufffdkey"] == b"v" and found["text"] == b"t"
    assert found["mmops.source.topic"] == b"in"  # an event cannot forge where it came from
    assert len(found["mmops.error.message"]) == 1000


def test_a_dead_letter_past_the_size_limits_keeps_a_prefix_and_drops_bulky_headers() -> None:
    message = SimpleNamespace(
        topic="in",
        partition=1,
        offset=9,
        timestamp=7,
        key=b"k" * 2000,
        value=b"v" * 5000,
        headers=[("blob", b"b" * 20_000)],
    )
    letter = dead_letter(message, "event_too_large", "too big", max_bytes=4000)
    headers = dict(letter.headers)
    assert letter.value == b"v" * 1024 and headers["mmops.value.truncated"] == b"5000"
    assert letter.key == b"k" * 1024 and headers["mmops.key.truncated"] == b"2000"
    assert "blob" not in headers and headers["mmops.headers.dropped"] == b"1"
    assert headers["mmops.source.partition"] == b"1" and headers["mmops.source.offset"] == b"9"


def png_with_a_garbage_chunk() -> bytes:
    """A PNG with a chunk of type 00 ff 01 02 between its image data: Pillow raises SyntaxError."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    data = buffer.getvalue()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    start = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start : start + 4])
    pixels = data[start + 8 : start + 8 + length]
    middle = chunk(b"IDAT", pixels[: length // 2]) + chunk(b"\x00\xff\x01\x02", b"junk")
    middle += chunk(b"IDAT", pixels[length // 2 :])
    return data[:start] + middle + data[start + 12 + length :]


def bare_predictor() -> Predictor:
    """The real Predictor's record handling, with a stand-in for the model run."""
    predictor = Predictor.__new__(Predictor)
    predictor.config = PredictConfig()
    predictor.image_spec = ImageSpec.default(8)
    predictor.labels = ["red", "blue"]
    predictor.identity = ModelIdentity("m", "1")

    def run(examples: list[Any]) -> Outputs:
        probs = np.tile(np.array([[0.75, 0.25]], dtype=np.float32), (len(examples), 1))
        return Outputs(probs, {"image": probs, "text": probs})

    predictor.run = run  # type: ignore[method-assign]
    return predictor


def test_a_png_with_a_garbage_chunk_is_an_undecodable_record_not_a_crash() -> None:
    image = base64.b64encode(png_with_a_garbage_chunk()).decode()
    records = [
        {"id": "bad", "text": "t", "image": image},
        {"id": "good", "text": "t", "image": None},
    ]
    bad, good = bare_predictor().predict_batch(records)
    assert bad["reason"] == "image_undecodable" and "broken PNG" in bad["error"]
    assert good["label"] == "red"


def test_any_error_preprocessing_one_record_leaves_the_others_predicted() -> None:
    predictor = bare_predictor()
    predictor.image_spec = "not a spec"  # type: ignore[assignment]  # .array() raises
    image = base64.b64encode(_tiny_png()).decode()
    bad, good = predictor.predict_batch(
        [{"id": "bad", "text": "t", "image": image}, {"id": "good", "text": "t", "image": None}]
    )
    assert bad["reason"] == "preprocess_failed" and "AttributeError" in bad["error"]
    assert good["label"] == "red"


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def test_kafka_settings_come_from_the_environment() -> None:
    settings = kafka_settings(
        {
            "KAFKA_BOOTSTRAP_SERVERS": "b1:9093, b2:9093",
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "svc",
            "KAFKA_SASL_PASSWORD": "secret",
        }
    )
    assert settings["bootstrap_servers"] == ["b1:9093", "b2:9093"]
    assert settings["security_protocol"] == "SASL_SSL"
    assert settings["sasl_plain_password"] == "secret"
    assert kafka_settings({})["bootstrap_servers"] == ["127.0.0.1:9092"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("KAFKA_SECURITY_PROTOCOL", "TLS"), ("KAFKA_SASL_MECHANISM", "MAGIC")],
)
def test_bad_kafka_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        kafka_settings({name: value})


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("stream.max_batch=0", "stream"),
        ("stream.workers=0", "workers"),
        ("stream.auto_offset_reset=middle", "stream.auto_offset_reset"),
        ("stream.output_topic=mmops.events", "topics must differ"),
        ("stream.metrics_port=70000", "stream.metrics_port"),
    ],
)
def test_stream_config_is_validated(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_params(None, [override])


def test_workers_share_the_cores_unless_threads_are_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(16)), raising=False)
    cfg = load_params().predict
    assert cfg.threads == 0
    assert serving_threads(cfg, 2).threads == 8
    assert serving_threads(cfg, 3).threads == 5
    assert serving_threads(cfg, 32).threads == 1  # never fewer than one
    pinned = load_params(None, ["predict.threads=4"]).predict
    assert serving_threads(pinned, 2).threads == 4


def test_only_an_alias_is_followed() -> None:
    cfg = load_params().predict
    assert ModelSource("models:/m@champion", cfg, 1.0).follow
    assert not ModelSource("models:/m/3", cfg, 1.0).follow
    assert not ModelSource("runs:/abc/model", cfg, 1.0).follow
    assert not ModelSource("models:/m@champion", cfg, 1.0, follow=False).follow


def test_up_only_starts_a_loopback_broker() -> None:
    assert loopback_port("127.0.0.1:9092") == 9092
    with pytest.raises(StackError, match="not a loopback address"):
        loopback_port("kafka.prod:9092")
