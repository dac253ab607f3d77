"""The promotion gate's decision, McNemar's test and the retrain flow's helpers, on plain data."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2

from mmops.config import GateConfig
from mmops.evaluation.records import ClassificationMetrics
from mmops.export.records import ExportReport, Gates, ParityResult
from mmops.tracking import registry
from mmops.tracking.gate import Score, gate, mcnemar_p
from mmops.tracking.registry import TAG_VALUE_LIMIT, reasons_tag, registration_tags
from mmops_flows.support import is_transient_error


def score(version: str, accuracy: float, groups: dict[str, float], correct: list[bool]) -> Score:
    gap = max(groups.values()) - min(groups.values()) if groups else 0.0
    return Score(version, accuracy, groups, gap, 10.0, "int8", correct)


def test_first_model_only_needs_the_floors() -> None:
    verdict = gate(score("1", 0.9, {"a": 0.9, "b": 0.88}, [True] * 9), None, GateConfig())
    assert verdict.passed and verdict.reasons == [] and verdict.p_value is None


def test_floors_name_each_failure() -> None:
    slow = Score("1", 0.5, {"a": 0.9, "b": 0.1}, 0.8, 900.0, "int8", [True])
    reasons = " | ".join(gate(slow, None, GateConfig()).reasons)
    assert "gate.min_accuracy" in reasons
    assert "gate.max_group_gap" in reasons
    assert "gate.max_latency_ms" in reasons


def test_regression_against_the_champion_is_rejected() -> None:
    champion = score("1", 0.92, {"a": 0.95, "b": 0.9}, [True] * 92 + [False] * 8)
    worse = score("2", 0.90, {"a": 0.97, "b": 0.82}, [True] * 90 + [False] * 10)

    verdict = gate(worse, champion, GateConfig())

    assert not verdict.passed
    reasons = " | ".join(verdict.reasons)
    assert "2.00 points below champion v1" in reasons
    assert "group 'b'" in reasons and "group 'a'" not in reasons
    assert "| accuracy | 0.9000 | 0.9200 |" in verdict.table()


def test_equal_model_passes_unless_significance_is_required() -> None:
    same = [True, False] * 50
    champion = score("1", 0.5 + 0.4, {}, same)
    challenger = score("2", 0.9, {}, same)
    assert gate(challenger, champion, GateConfig()).passed
    strict = GateConfig(require_significance=True)
    verdict = gate(challenger, champion, strict)
    assert not verdict.passed and "not significant" in verdict.reasons[0]


def test_mcnemar_counts_only_discordant_pairs() -> None:
    assert mcnemar_p([True] * 10, [True] * 10) == 1.0
    # 10 wins, 0 losses: p = 2**-10.
    assert mcnemar_p([True] * 10, [False] * 10) == pytest.approx(2**-10)
    # 5 wins, 5 losses: no evidence either way.
    ours = [True] * 5 + [False] * 5
    assert mcnemar_p(ours, [not x for x in ours]) == pytest.approx(0.623046875)


def test_transient_errors_are_retried_and_data_errors_are_not() -> None:
    assert is_transient_error(ConnectionError("refused"))
    assert is_transient_error(sqlite3.OperationalError("database is locked"))
    try:
        try:
            raise TimeoutError("read timed out")
        except TimeoutError as inner:
            raise RuntimeError("tracking call failed") from inner
    except RuntimeError as outer:
        assert is_transient_error(outer)
    assert not is_transient_error(ValueError("bad params"))


def parity_result(candidate: str, reasons: list[str]) -> ParityResult:
    return ParityResult(candidate, not reasons, reasons, 0.97, 0.0, 0.0, {})


def test_registration_tags_carry_data_code_metrics_and_verdict() -> None:
    export = ExportReport(
        serving="fp32",
        attention="fused",
        gates=Gates(fp32=parity_result("fp32", []), int8=parity_result("int8", ["agrees 0.97"])),
        accuracy={},
        size_bytes={},
        latency={},
        test_examples=0,
    )
    tags = registration_tags(
        {"md5": "abc.dir", "dvc_md5": None, "git_commit": "deadbeef"},
        ClassificationMetrics(accuracy=0.91, macro_f1=0.9, per_class={}, confusion_matrix=[]),
        export,
        "run123",
    )
    assert tags["data.md5"] == "abc.dir" and tags["git.commit"] == "deadbeef"
    assert tags["test.accuracy"] == "0.910000" and tags["train.run_id"] == "run123"
    assert tags["export.int8_passed"] == "False" and tags["export.int8_reasons"] == "agrees 0.97"


def test_tag_values_are_cut_to_mlflows_limit() -> None:
    assert reasons_tag([]) == "none"
    assert reasons_tag(["a", "b"]) == "a; b"
    assert len(reasons_tag(["x" * 6000])) == TAG_VALUE_LIMIT


class FailingClient:
    """An MLflow client whose registry reads all fail with one error code."""

    def __init__(self, error_code: str) -> None:
        self.error_code = error_code

    def __getattr__(self, method: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            code = getattr(databricks_pb2, self.error_code)
            raise MlflowException(f"{method}: {self.error_code}", error_code=code)

        return fail


@pytest.mark.parametrize("code", ["PERMISSION_DENIED", "INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE"])
def test_a_registry_error_is_not_taken_for_no_champion(
    code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "mlflow_client", lambda: FailingClient(code))
    with pytest.raises(MlflowException, match=code):
        registry.champion_version("m")


def test_a_missing_model_means_no_champion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "mlflow_client", lambda: FailingClient("RESOURCE_DOES_NOT_EXIST"))
    assert registry.champion_version("m") is None


def moves(*steps: tuple[str, str, str | None]) -> list[dict[str, Any]]:
    return [{"action": a, "version": v, "previous": p, "state": "done"} for a, v, p in steps]


def test_the_rollback_stack_drops_the_versions_rolled_back_from() -> None:
    from mmops.tracking.history import stack

    promoted = moves(("promote", "1", None), ("promote", "2", "1"), ("promote", "3", "2"))
    assert stack(promoted, "3") == ["1", "2", "3"]
    back = [*promoted, *moves(("rollback", "2", "3"))]
    assert stack(back, "2") == ["1", "2"]
    # A version promoted again moves to the top instead of appearing twice.
    again = [*promoted, *moves(("promote", "1", "3"))]
    assert stack(again, "1") == ["2", "3", "1"]


def test_the_rollback_stack_skips_pending_moves_and_follows_the_alias() -> None:
    from mmops.tracking.history import stack

    entries = moves(("promote", "1", None), ("promote", "2", "1"))
    entries[-1]["state"] = "pending"
    assert stack(entries, "1") == ["1"]
    # Champion set outside mmops: it counts as the latest promotion.
    assert stack(moves(("promote", "1", None)), "5") == ["1", "5"]
    # A log written before the states existed counts as done.
    assert stack([{"action": "promote", "version": "4", "previous": None}], "4") == ["4"]
