"""The package's shape: import-linter's contracts, module sizes, packaging, and DVC deps that
follow the code each stage really imports."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# The library entry of each DVC stage; its deps are these modules and all they import.
STAGE_ENTRIES = {
    "demo_data": ["mmops.data.demo"],
    "validate": ["mmops.data.validate", "mmops.data.validation_report"],
    "train": ["mmops.tracking.train_run"],
    "evaluate": ["mmops.tracking.evaluate_run"],
    "export": ["mmops.tracking.export_run"],
}
MAX_MODULE_LINES = 400


def test_import_linter_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "broken" in done.stdout and " 0 broken" in done.stdout


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for path in [*ROOT.glob("mmops/**/*.py"), *ROOT.glob("flows/*.py")]
    }
    too_long = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"split these modules (over {MAX_MODULE_LINES} lines): {too_long}"


def test_packaging_lists_every_package_and_installs_flows_under_a_project_name() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in ROOT.glob("mmops/**/__init__.py")
    }
    assert set(setuptools["packages"]) == folders | {"mmops_flows"}
    assert setuptools["package-dir"] == {"mmops_flows": "flows"}
    assert (ROOT / "mmops" / "py.typed").is_file()


def module_file(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_files(entries: list[str], graph: grimp.ImportGraph) -> set[str]:
    """Files of `entries`, of every mmops module they import (also inside functions), and of
    the packages around them (importing a module runs its packages' __init__)."""
    modules = set(entries)
    for entry in entries:
        modules |= graph.find_upstream_modules(entry)
    for module in list(modules):
        parts = module.split(".")
        modules |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return {str(module_file(m).relative_to(ROOT)) for m in modules if m.startswith("mmops")}


def declared_files(deps: list[str]) -> set[str]:
    files: set[str] = set()
    for dep in deps:
        path = ROOT / dep
        if dep.startswith("mmops/") or dep == "mmops":
            found = path.rglob("*.py") if path.is_dir() else [path]
            files |= {str(p.relative_to(ROOT)) for p in found}
    return files


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("mmops", include_external_packages=False)


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRIES))
def test_dvc_stage_deps_are_the_code_the_stage_imports(
    stage: str, graph: grimp.ImportGraph
) -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    expected = imported_files(STAGE_ENTRIES[stage], graph)
    declared = declared_files(stages[stage]["deps"])
    assert declared == expected, (
        f"dvc.yaml {stage}: missing {sorted(expected - declared)}, "
        f"not imported {sorted(declared - expected)}"
    )


def test_every_stage_of_dvc_yaml_has_an_entry_here() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_ENTRIES)


def test_the_library_reads_no_params_file_at_import() -> None:
    # Nothing happens at import (STYLE.md): no module-level call of the loaders or of mlflow.
    calls = {"resolve_params", "load_params", "set_tracking_uri", "basicConfig"}
    for path in ROOT.glob("mmops/**/*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                func = node.value.func
                name = getattr(func, "attr", getattr(func, "id", ""))
                assert name not in calls, f"{path}: calls {name} at import"


MAX_FUNCTION_LINES = 60
WHOLE = "# Reads better whole:"


def test_long_functions_say_why_they_stay_whole() -> None:
    too_long = []
    for path in [*ROOT.glob("mmops/**/*.py"), *ROOT.glob("flows/*.py")]:
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = lines[node.lineno - 1 : node.end_lineno]
                if len(body) > MAX_FUNCTION_LINES and not any(WHOLE in line for line in body):
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not too_long, f"over {MAX_FUNCTION_LINES} lines without `{WHOLE} ...`: {too_long}"


def test_readme_layout_lists_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") : readme.index("## Benchmarks")]
    modules = [
        p for p in [*ROOT.glob("mmops/**/*.py"), *ROOT.glob("flows/*.py")] if p.stem[0] != "_"
    ]
    missing = [str(p.relative_to(ROOT)) for p in modules if f" {p.name} " not in layout]
    assert not missing, f"README.md Layout does not list {missing}"
