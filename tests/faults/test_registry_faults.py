"""The registry's services failing under the real CLI: `mlflow server` SIGKILLed during
`mmops retrain` (a real Prefect flow run), its artifact store out of space.

The faults are `bench/chaos.py`'s (tests/faults/test_stream_faults.py loads it the same way);
tests/faults/test_tracking_faults.py has the single commands and `mmops doctor`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_stream_faults import chaos

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_retrain_whose_tracking_server_dies_fails_within_minutes_in_one_line(
    tmp_path: Path,
) -> None:
    # Before: about 17 minutes to the first task failure, no `error:` line, runs left RUNNING.
    result = chaos.tracking_faults(["mlflow_down_retrain"], tmp_path)["mlflow_down_retrain"]
    assert result["exit_code"] == 1 and result["clear_error"], result
    assert result["failed_after_s"] < 180, result  # short deadlines and the tasks' retries
    assert "unreachable (connection refused)" in result["error"], result
    # The run the dead server left RUNNING is closed once it is back.
    assert result["orphaned_runs"] >= 1 and result["closed_by_doctor"] == result["orphaned_runs"]


def test_an_artifact_store_out_of_space_fails_the_run_cleanly_and_a_rerun_succeeds(
    tmp_path: Path,
) -> None:
    result = chaos.tracking_faults(["artifact_disk_full"], tmp_path)["artifact_disk_full"]
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert result["exit_code"] == 1 and result["clear_error"], result
    assert "artifact store may be full" in result["error"], result
    assert result["runs_marked_failed"] == 1 and result["running_left"] == 0, result
    assert result["rerun_exit_code"] == 0, result
