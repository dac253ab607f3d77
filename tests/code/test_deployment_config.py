"""The production Prefect deployment declared in infra/ matches the flow and params.yaml, and
pins every flow run to the commit that was deployed."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from pathlib import Path

import pytest
import yaml

from mmops.config import load_params

ROOT = Path(__file__).resolve().parents[2]
RUN_SHELL_SCRIPT = "prefect.deployments.steps.run_shell_script"
GIT_CLONE = "prefect.deployments.steps.git_clone"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_prefect_yaml_declares_the_monthly_retrain() -> None:
    spec = yaml.safe_load((ROOT / "infra/prefect/prefect.yaml").read_text())
    [deployment] = spec["deployments"]
    params = load_params(ROOT / "params.yaml")

    path, name = deployment["entrypoint"].split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    assert getattr(module, name).name == "retrain_and_evaluate"
    [schedule] = deployment["schedules"]
    assert schedule["cron"] == params.schedule.cron == "0 3 1 * *"
    assert schedule["timezone"] == params.schedule.timezone
    assert deployment["name"] == params.schedule.name


def prefect_spec() -> dict:
    return yaml.safe_load((ROOT / "infra/prefect/prefect.yaml").read_text())


def step(steps: list[dict], name: str) -> dict:
    [inputs] = [s[name] for s in steps if name in s]
    return dict(inputs)


def pin(monkeypatch: pytest.MonkeyPatch, commit: str | None) -> dict[str, str]:
    """Run the deployment's build step as `prefect deploy` does, with MMOPS_GIT_COMMIT=commit."""
    from prefect.deployments.steps.utility import run_shell_script

    inputs = step(prefect_spec()["build"], RUN_SHELL_SCRIPT)
    inputs.pop("id")
    if commit is None:
        monkeypatch.delenv("MMOPS_GIT_COMMIT", raising=False)
    else:
        monkeypatch.setenv("MMOPS_GIT_COMMIT", commit)
    # The script runs on the PATH's python3, from the repository root, like `prefect deploy`.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(ROOT)
    return asyncio.run(run_shell_script(**inputs, stream_output=False))


def test_flow_runs_clone_the_commit_the_deploy_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.runner.storage import GitRepository
    from prefect.utilities.templating import apply_values

    spec = prefect_spec()
    clone = step(spec["pull"], GIT_CLONE)
    assert "branch" not in clone, "a branch moves: runs would not run the code that was deployed"
    build_id = step(spec["build"], RUN_SHELL_SCRIPT)["id"]
    assert clone["commit_sha"] == f"{{{{ {build_id}.stdout }}}}"
    # `prefect deploy` fills the pull steps with the build steps' outputs, and keeps the rest
    # (the repository, from the flow run's environment) for the run.
    output = pin(monkeypatch, COMMIT)
    pull = apply_values(spec["pull"], {build_id: output, **output}, remove_notset=False)
    deployed = step(pull, GIT_CLONE)
    assert deployed["commit_sha"] == COMMIT
    assert deployed["repository"] == "{{ $MMOPS_GIT_REPOSITORY }}"
    GitRepository(url="https://example.com/mmops.git", commit_sha=deployed["commit_sha"])


@pytest.mark.parametrize("commit", [None, "", "main", "v0.1.0", COMMIT[:12], "HEAD"])
def test_deploy_fails_without_a_full_commit_sha(
    monkeypatch: pytest.MonkeyPatch, commit: str | None
) -> None:
    with pytest.raises(RuntimeError, match="MMOPS_GIT_COMMIT must be the full SHA"):
        pin(monkeypatch, commit)


def test_the_pull_steps_install_and_pull_in_the_clone() -> None:
    pull = prefect_spec()["pull"]
    clone_id = step(pull, GIT_CLONE)["id"]
    script = step(pull, RUN_SHELL_SCRIPT)
    assert script["directory"] == f"{{{{ {clone_id}.directory }}}}"
    # Without `shell: true` each line is one command: `&&` would be an argument, not an operator.
    if not script.get("shell"):
        for line in script["script"].splitlines():
            assert not {"&&", "||", "|", ";"} & set(line.split()), line
