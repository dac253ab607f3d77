"""The consumers' dashboards and alerts (infra/grafana, infra/prometheus/alerts.yml) against the
metrics `mmops serve` exports, generic over modalities, and wired into compose and Kubernetes.

promtool checks the rules and runs their unit tests (alerts.test.yml): without it these skip,
unless CI is set, where they fail (infra/local/setup.sh installs it when run as root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_infra_compose import INFRA, ROOT, mounts, services

from mmops.config import load_params
from mmops.stream.metrics import StreamMetrics

PROMETHEUS = INFRA / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts.test.yml"
GRAFANA = INFRA / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCES = GRAFANA / "provisioning/datasources/prometheus.yml"
PROVIDER = GRAFANA / "provisioning/dashboards/provider.yml"
K8S = INFRA / "k8s"
# Kubernetes copies (kustomize reads nothing outside infra/k8s): ConfigMap, key, source.
K8S_COPIES = {
    "mmops-prometheus-rules": ("mmops-alerts.yml", ALERTS),
    "mmops-grafana-dashboards": ("mmops-stream.json", GRAFANA / "dashboards/mmops-stream.json"),
}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
# Written by Prometheus for every target, not by the consumer.
PROMETHEUS_SERIES = {"up"}
# The signals the monitor watches today: label values, never to be named in an expression.
SIGNALS = ("image", "text", "fused", "prediction")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}
PROMQL_WORDS = {"and", "or", "unless", "bool", "inf", "nan"}
SEVERITIES = {"info", "warning", "critical"}


def ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if ci():
            pytest.fail("promtool is not installed: infra/local/setup.sh installs it as root")
        pytest.skip("promtool is not installed (infra/local/setup.sh installs it as root)")
    return found


def run_promtool(*args: str | Path) -> str:
    result = subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@cache
def exported_series() -> dict[str, str]:
    """Every series name a consumer exposes, mapped to its metric family."""
    families = StreamMetrics().registry.collect()
    return {f.name + suffix: f.name for f in families for suffix in SUFFIXES[f.type]}


@cache
def modality_metrics() -> tuple[str, ...]:
    """The metrics labelled by modality (the drift monitor's signals)."""
    metrics = vars(StreamMetrics()).values()
    found = [m._name for m in metrics if "modality" in getattr(m, "_labelnames", ())]
    assert found
    return tuple(sorted(found))


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels or variables)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\$\{\w+(?::\w+)?\}|\$\w+", "", text)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\b(?:group_left|group_right)\b|\boffset\s+-?\w+", "", text)
    words = re.findall(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", text)
    return set(words) - PROMQL_WORDS


@cache
def alert_groups() -> list[dict[str, Any]]:
    return yaml.safe_load(ALERTS.read_text())["groups"]


def alert_rules() -> dict[str, dict[str, Any]]:
    rules = [rule for group in alert_groups() for rule in group["rules"]]
    assert all("alert" in rule for rule in rules), "alerts.yml holds only alerting rules"
    return {rule["alert"]: rule for rule in rules}


@cache
def dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board["templating"]["list"]}


def expressions(node: Any) -> Iterator[str]:
    """Every `expr` in a dashboard: panel targets and annotation queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def variable_metrics(board: dict[str, Any]) -> set[str]:
    found = set()
    for variable in variables(board).values():
        if variable["type"] == "query":
            [metric] = re.findall(r"label_values\((\w+)\s*,", variable["definition"])
            found.add(metric)
    return found


def all_expressions() -> list[tuple[str, str]]:
    """(where, expr) for every dashboard expression and alert rule."""
    found = [(f"{p.name}", e) for p in DASHBOARDS for e in expressions(dashboard(p))]
    found += [(f"alerts.yml {name}", rule["expr"]) for name, rule in alert_rules().items()]
    return found


def alert_tests() -> list[dict[str, Any]]:
    return yaml.safe_load(ALERT_TESTS.read_text())["tests"]


@pytest.fixture(scope="module", autouse=True)
def alert_unit_tests() -> Iterator[subprocess.Popen[str] | None]:
    """`promtool test rules`, started before the module's first test: a day of series takes it
    seconds, which the other tests overlap. The last test reads its result."""
    if shutil.which("promtool") is None:
        yield None
        return
    args = [promtool(), "test", "rules", str(ALERT_TESTS)]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as run:
        yield run
        if run.poll() is None:
            run.kill()


def test_metric_names_reads_selectors_not_functions_labels_or_variables() -> None:
    expr = (
        'sum by (modality) (rate(mmops_a_total{outcome="x", instance=~"$instance"}'
        "[$__rate_interval] offset 1h)) / on (job) group_left (version) up"
        " and histogram_quantile(0.95, mmops_b_bucket) > 1e3"
    )
    assert metric_names(expr) == {"mmops_a_total", "up", "mmops_b_bucket"}


def test_the_rules_and_the_scrape_config_pass_promtool_check() -> None:
    out = run_promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert "1 rule files found" in out
    out = run_promtool("check", "rules", ALERTS)
    assert f"{len(alert_rules())} rules found" in out


def test_every_alert_is_tested_firing_and_quiet() -> None:
    fired, quiet = set(), set()
    for test in alert_tests():
        for case in test["alert_rule_test"]:
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert set(alert_rules()) == fired, f"never seen firing: {set(alert_rules()) - fired}"
    assert set(alert_rules()) == quiet, f"never seen quiet: {set(alert_rules()) - quiet}"
    # The drift alarm fires for signals the monitor has no name for today.
    drift = [
        t
        for t in alert_tests()
        if any(c["alertname"] == "MmopsDriftAlarm" for c in t["alert_rule_test"])
    ]
    fired_for = {
        alert["exp_labels"]["modality"]
        for test in drift
        for case in test["alert_rule_test"]
        for alert in case.get("exp_alerts") or []
    }
    assert fired_for and not fired_for & set(SIGNALS), fired_for


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """promtool parses each expression, its Grafana variables given values."""
    values = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
    values |= {"instance": ".*", "modality": "audio", "datasource": "x"}

    def fill(expr: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m[1] or m[2]], expr)

    exprs = [fill(e) for p in DASHBOARDS for e in expressions(dashboard(p))]
    rules = [{"record": f"dashboard:expression_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"{len(rules)} rules found" in run_promtool("check", "rules", path)


def test_every_metric_in_the_dashboards_and_alerts_is_exported() -> None:
    known = set(exported_series()) | PROMETHEUS_SERIES
    for where, expr in all_expressions():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= known, f"{where}: {names - known} is no metric of StreamMetrics"
    for path in DASHBOARDS:
        assert variable_metrics(dashboard(path)) <= known, path.name
    series = [s["series"] for t in alert_tests() for s in t["input_series"]]
    for name in {s.split("{")[0] for s in series}:
        assert name in known, f"alerts.test.yml feeds {name}, which no consumer exports"


def test_the_dashboards_show_every_metric_the_consumer_exports() -> None:
    shown = {
        exported_series()[name]
        for path in DASHBOARDS
        for expr in expressions(dashboard(path))
        for name in metric_names(expr)
        if name in exported_series()
    }
    missing = set(exported_series().values()) - shown
    assert not missing, f"add a panel for {sorted(missing)} to infra/grafana/dashboards"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_valid_with_unique_panels_on_the_provisioned_source(path: Path) -> None:
    board = dashboard(path)
    assert board["uid"] and len(board["uid"]) <= 40 and board["title"]
    assert board["schemaVersion"] >= 39
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    boxes = [(p["id"], p["gridPos"]) for p in panels(board)]
    for i, (a, g) in enumerate(boxes):
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"panel {a} leaves the grid"
        for b, h in boxes[i + 1 :]:
            overlap_x = g["x"] < h["x"] + h["w"] and h["x"] < g["x"] + g["w"]
            overlap_y = g["y"] < h["y"] + h["h"] and h["y"] < g["y"] + g["h"]
            assert not (overlap_x and overlap_y), f"panels {a} and {b} overlap"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE_REF, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE_REF, panel["title"]
            assert target["expr"].strip(), panel["title"]
    # ${datasource} defaults to the provisioned Prometheus; another Grafana picks its own.
    [source] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    chosen = variables(board)["datasource"]
    assert chosen["type"] == "datasource" and chosen["query"] == source["type"] == "prometheus"
    assert chosen["current"]["value"] == source["uid"]
    for variable in variables(board).values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE_REF, variable["name"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_uses_only_defined_variables(path: Path) -> None:
    board = dashboard(path)
    defined = set(variables(board))
    texts = [*expressions(board), *(p.get("title", "") for p in panels(board))]
    used = {m[1] or m[2] for t in texts for m in re.finditer(r"\$\{(\w+)[^}]*\}|\$(\w+)", t)}
    used |= {p["repeat"] for p in panels(board) if p.get("repeat")}
    assert {v for v in used if not v.startswith("__")} <= defined, used - defined


def test_modalities_come_from_a_variable_never_from_names() -> None:
    [board] = [dashboard(p) for p in DASHBOARDS if dashboard(p)["uid"] == "mmops-stream"]
    modality = variables(board)["modality"]
    assert modality["type"] == "query"
    assert re.fullmatch(
        r"label_values\(mmops_drift_statistic,\s*modality\)", modality["definition"]
    )
    assert modality["multi"] and modality["includeAll"]
    assert any(p.get("repeat") == "modality" for p in panels(board)), "no panel per modality"
    matcher = re.compile(r'modality\s*(?:=~|!~|!=|=)\s*"([^"]*)"')
    for where, expr in all_expressions():
        for value in matcher.findall(expr):
            assert value.startswith("$"), f"{where}: modality {value!r} is named, not templated"
        for name in SIGNALS:
            assert f'"{name}"' not in expr, f"{where}: names the signal {name}"
    # Every selector of a per-modality metric on the dashboard follows the variable.
    names = "|".join(modality_metrics())
    selector = re.compile(rf"\b({names})\{{([^}}]*)\}}")
    found = [m for e in expressions(board) for m in selector.finditer(e)]
    assert len(found) >= len(modality_metrics())
    for m in found:
        assert re.search(r'modality=~?"\$modality"', m[2]), f"{m[0]} ignores $modality"


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    rules = alert_rules()
    names = [rule["alert"] for group in alert_groups() for rule in group["rules"]]
    assert len(names) == len(set(names))
    assert {
        "MmopsDriftAlarm",
        "MmopsOnlineAccuracyDrop",
        "MmopsDeadLetterRateHigh",
        "MmopsConsumerLagHigh",
        "MmopsConsumerDown",
        "MmopsConsumerNotReady",
        "MmopsDriftMonitorSkipping",
    } <= set(rules)
    for name, rule in rules.items():
        assert name.startswith("Mmops"), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    drift = rules["MmopsDriftAlarm"]
    assert drift["for"] and "modality" in drift["expr"]
    assert "$labels.modality" in drift["annotations"]["summary"]


def test_alert_templates_name_only_labels_their_alerts_carry() -> None:
    """Each `$labels.X` of an annotation is a label of that alert where promtool fires it."""
    carried: dict[str, set[str]] = {}
    for test in alert_tests():
        for case in test["alert_rule_test"]:
            for alert in case.get("exp_alerts") or []:
                carried.setdefault(case["alertname"], set()).update(alert["exp_labels"])
    for name, rule in alert_rules().items():
        for text in rule["annotations"].values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in carried[name], f"{name}: {{{{ $labels.{label} }}}} is never set"


def test_the_accuracy_floor_is_the_promotion_gate() -> None:
    floor = load_params(ROOT / "params.yaml").gate.min_accuracy
    expr = alert_rules()["MmopsOnlineAccuracyBelowFloor"]["expr"]
    [value] = re.findall(r"<\s*([\d.]+)\s*$", expr.strip())
    assert float(value) == floor
    [board] = [dashboard(p) for p in DASHBOARDS if dashboard(p)["uid"] == "mmops-stream"]
    [accuracy] = [p for p in panels(board) if "mmops_online_accuracy" in json.dumps(p)]
    steps = accuracy["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert floor in [s["value"] for s in steps]


def test_the_kubernetes_copies_are_identical_to_their_sources() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    generators = {g["name"]: g for g in kustomization["configMapGenerator"]}
    for name, (key, source) in K8S_COPIES.items():
        generator = generators[name]
        [item] = generator["files"]
        key_, _, copy = item.partition("=")
        assert key_ == key
        origin = source.relative_to(ROOT)
        assert (K8S / copy).read_bytes() == source.read_bytes(), (
            f"infra/k8s/{copy} differs from its source: cp {origin} infra/k8s/{copy}"
        )
        # Mounted or found by name and label: no content hash in the name.
        assert generator["options"]["disableNameSuffixHash"] is True
    labels = generators["mmops-grafana-dashboards"]["options"]["labels"]
    assert labels == {"grafana_dashboard": "1"}
    if shutil.which("kubectl") is None:
        return
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    built = {
        o["metadata"]["name"]: o for o in yaml.safe_load_all(out) if o and o["kind"] == "ConfigMap"
    }
    for name, (key, source) in K8S_COPIES.items():
        assert built[name]["data"] == {key: source.read_text()}, name


def test_compose_mounts_the_rules_and_the_grafana_provisioning() -> None:
    prometheus, grafana = services()["prometheus"], services()["grafana"]
    by_target = {m["target"]: m for m in mounts(prometheus)}
    config = by_target["/etc/prometheus/prometheus.yml"]
    scrape = yaml.safe_load((INFRA / config["source"]).read_text())
    for rule_file in scrape["rule_files"]:
        target = str(Path(config["target"]).parent / rule_file)
        assert target in by_target, f"prometheus.yml reads {target}, which is not mounted"
        assert (INFRA / by_target[target]["source"]).resolve() == ALERTS
        assert by_target[target]["read_only"]

    grafana_mounts = {m["target"]: m for m in mounts(grafana)}
    for target, mount in grafana_mounts.items():
        if mount["source"].startswith("."):
            assert (INFRA / mount["source"]).exists(), mount["source"]
            assert mount["read_only"], target
    provisioning = "/etc/grafana/provisioning"
    assert (
        grafana_mounts[f"{provisioning}/datasources"]["source"]
        == "./grafana/provisioning/datasources"
    )
    assert (
        grafana_mounts[f"{provisioning}/dashboards"]["source"]
        == "./grafana/provisioning/dashboards"
    )
    [provider] = yaml.safe_load(PROVIDER.read_text())["providers"]
    dashboards = grafana_mounts[provider["options"]["path"]]
    assert (INFRA / dashboards["source"]).resolve() == GRAFANA / "dashboards"
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert str(home.parent) == provider["options"]["path"]
    assert GRAFANA / "dashboards" / home.name in DASHBOARDS

    # The data source is the compose Prometheus, sampled at its scrape interval.
    [source] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090"
    assert any(str(p).endswith(":9090") for p in prometheus["ports"])
    assert source["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert re.fullmatch(r"grafana/grafana-oss:\d+\.\d+\.\d+", grafana["image"])
    raw = yaml.safe_load((INFRA / "docker-compose.yml").read_text())["services"]["grafana"]
    assert raw["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")


def test_the_alert_unit_tests_pass(alert_unit_tests: subprocess.Popen[str] | None) -> None:
    if alert_unit_tests is None:
        promtool()  # skips, or fails under CI
        return
    out, _ = alert_unit_tests.communicate(timeout=120)
    assert alert_unit_tests.returncode == 0, out
    assert "SUCCESS" in out
