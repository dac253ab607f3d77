"""mmops/environment.py lists every environment variable the code reads, and the README too."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from mmops.environment import LIBRARY_VARIABLES, VARIABLES
from mmops.stream.settings import KAFKA_ENV

ROOT = Path(__file__).resolve().parents[2]
READERS = {"get", "getenv", "setdefault", "pop"}


def names_read(path: Path) -> set[str]:
    """Names passed to os.getenv or environ.get/setdefault/pop, or used as environ[name]."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in READERS
            and (node.func.attr == "getenv" or "environ" in ast.unparse(node.func.value))
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add(node.args[0].value)
        if (
            isinstance(node, ast.Subscript)
            and "environ" in ast.unparse(node.value)
            and isinstance(node.slice, ast.Constant)
        ):
            found.add(node.slice.value)
    return found


def test_the_code_reads_only_listed_variables() -> None:
    read = set(KAFKA_ENV)
    for path in [*ROOT.glob("mmops/**/*.py"), *ROOT.glob("flows/*.py")]:
        read |= names_read(path)
    assert "MLFLOW_TRACKING_URI" in read  # the scan finds what it should
    assert read <= set(VARIABLES), f"read but not in mmops/environment.py: {read - set(VARIABLES)}"
    assert not set(VARIABLES) & set(LIBRARY_VARIABLES)


def test_the_readme_documents_every_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in [*VARIABLES, *LIBRARY_VARIABLES] if f"`{name}`" not in readme]
    assert not missing, f"README.md lacks {missing}"


# Keys whose value is a mapping of the user's own keys, not a section: documented as one.
FREE_FORM = ("train.search.space",)


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        nested = isinstance(value, dict) and path not in FREE_FORM
        keys += leaf_keys(value, f"{path}.") if nested else [path]
    return keys


def test_the_readme_configuration_reference_has_every_params_key() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Configuration reference")
    reference = readme[start : readme.index("\n## ", start + 1)]
    rows = [line for line in reference.splitlines() if line.startswith("| `")]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    missing = []
    for key in leaf_keys(params):
        section, *_, name = key.split(".")
        # A row names its section's first key in full and may list siblings by name only.
        if not any(f"`{section}." in row and f"{name}`" in row for row in rows):
            missing.append(key)
    assert not missing, f"README's configuration reference lacks {missing}"
