"""The Great Expectations suite on the manifest: types, nulls, uniqueness, sets and lengths."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

from mmops.config import Params
from mmops.data.checks import CheckResult
from mmops.data.dataset import REQUIRED_COLUMNS, SPLITS
from mmops.data.images import UNSAFE_PATH


def build_expectations(columns: Iterable[str], params: Params) -> list:
    """The GX suite for a manifest with these columns, each expectation tagged with its check."""
    import great_expectations as gx

    e = gx.expectations
    v = params.validate
    columns = set(columns)
    expectations = [
        e.ExpectColumnToExist(column=c, meta={"check": "columns.required"})
        for c in REQUIRED_COLUMNS
    ]

    def add(column: str, check: str, expectation: type, **kwargs: Any) -> None:
        if column in columns:
            expectations.append(expectation(column=column, meta={"check": check}, **kwargs))

    for column in ("id", "image", "text", "label", "split", "group"):
        add(column, f"types.{column}", e.ExpectColumnValuesToBeOfType, type_="str")
    add("id", "id.not_null", e.ExpectColumnValuesToNotBeNull)
    add("id", "id.non_empty", e.ExpectColumnValueLengthsToBeBetween, min_value=1)
    add("id", "id.unique", e.ExpectColumnValuesToBeUnique)
    add("label", "label.not_null", e.ExpectColumnValuesToNotBeNull)
    if v.labels is not None:
        add("label", "label.in_set", e.ExpectColumnValuesToBeInSet, value_set=list(v.labels))
    add("split", "split.in_set", e.ExpectColumnValuesToBeInSet, value_set=list(SPLITS))
    add("text", "text.not_blank", e.ExpectColumnValuesToNotMatchRegex, regex=r"^\s*$")
    add(
        "text",
        "text.length",
        e.ExpectColumnValueLengthsToBeBetween,
        min_value=v.text_min_chars,
        max_value=v.text_max_chars,
    )
    add(
        "text",
        "text.missing_rate",
        e.ExpectColumnValuesToNotBeNull,
        mostly=1.0 - params.data.max_missing_text_rate,
    )
    add(
        "image",
        "image.missing_rate",
        e.ExpectColumnValuesToNotBeNull,
        mostly=1.0 - params.data.max_missing_image_rate,
    )
    add("image", "image.path_relative", e.ExpectColumnValuesToNotMatchRegex, regex=UNSAFE_PATH)
    add("image", "image.extension", e.ExpectColumnValuesToMatchRegex, regex=r"(?i)\.(?:png|jpe?g)$")
    return expectations


def run_expectations(frame: pd.DataFrame, params: Params) -> tuple[list[CheckResult], dict]:
    """Validate the manifest with Great Expectations; returns our checks and GX's raw result."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        ),
    )
    batch = (
        context.data_sources.add_pandas("dataset")
        .add_dataframe_asset(name="manifest")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="manifest"))
    for expectation in build_expectations(frame.columns, params):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="manifest", data=batch, suite=suite)
    )
    result = definition.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")
    ids = frame["id"].map(str).tolist() if "id" in frame else None

    merged: dict[str, list] = {}
    for r in result.results:
        merged.setdefault(r.expectation_config.meta["check"], []).append(r)
    checks = []
    for name, results in merged.items():
        rows = sorted({i for r in results for i in r.result.get("unexpected_index_list") or []})
        details = [_describe_gx(r) for r in results if not r.success]
        checks.append(
            CheckResult(
                name,
                all(r.success for r in results),
                "; ".join(d for d in details if d),
                ids=tuple(ids[i] for i in rows) if ids else (),
                source="great_expectations",
            )
        )
    return checks, result.to_json_dict()


def _describe_gx(result: Any) -> str:
    info = result.exception_info or {}
    if info.get("raised_exception"):
        return f"could not evaluate: {info.get('exception_message')}"
    config = result.expectation_config
    column = config.kwargs.get("column")
    if config.type == "expect_column_to_exist":
        return f"missing column '{column}'"
    count = result.result.get("unexpected_count", 0)
    total = result.result.get("element_count", 0)
    values = result.result.get("partial_unexpected_list") or []
    shown = ", ".join(repr(x) for x in values[:5])
    return f"column '{column}': {count} of {total} rows" + (f" (e.g. {shown})" if shown else "")
