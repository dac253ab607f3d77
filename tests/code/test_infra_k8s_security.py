"""infra/k8s fences each workload: its own secret keys, and network policies that let it reach
only the endpoints config.yaml names (and let in only what must come in)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from test_infra_k8s import (
    POOL,
    find,
    kustomization,
    load,
    objects,
    pool_pod_template,
    secrets,
)

WORKLOAD_KINDS = ("Deployment", "Job", "StatefulSet", "DaemonSet")
NAME = "app.kubernetes.io/name"
KAFKA_SASL = {"KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"}
MLFLOW_LOGIN = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
S3_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
# What each container may hold, and from which Secret: nothing more, nothing less.
NEEDS: dict[str, tuple[str, set[str]]] = {
    "mmops-serve/serve": ("mmops-serve-secrets", KAFKA_SASL | MLFLOW_LOGIN),
    "mmops-serve-http/serve-http": ("mmops-serve-http-secrets", MLFLOW_LOGIN),
    "mmops-topics/topics": ("mmops-topics-secrets", KAFKA_SASL),
    "prefect-worker/worker": (
        "mmops-prefect-secrets",
        {"PREFECT_API_KEY", "PREFECT_API_AUTH_STRING"},
    ),
    # The DVC pull (init container) and the training container split the Job's keys.
    "mmops-train/data": ("mmops-train-secrets", S3_KEYS),
    "mmops-train/train": ("mmops-train-secrets", MLFLOW_LOGIN),
    f"{POOL}/prefect-job": ("mmops-train-secrets", S3_KEYS | MLFLOW_LOGIN),
}
# The endpoints of config.yaml each workload's pods must reach, besides DNS.
REACHES: dict[str, set[str]] = {
    "mmops-serve": {"KAFKA_BOOTSTRAP_SERVERS", "MLFLOW_TRACKING_URI"},
    "mmops-serve-http": {"MLFLOW_TRACKING_URI"},
    "mmops-topics": {"KAFKA_BOOTSTRAP_SERVERS"},
    "mmops-train": {"MLFLOW_TRACKING_URI"},
    "prefect-worker": {"PREFECT_API_URL"},
    POOL: {"PREFECT_API_URL", "MLFLOW_TRACKING_URI"},
}
# Workloads that talk HTTPS outside the cluster: S3 (DVC remote), the git host, the API server.
HTTPS_OUT = {"mmops-train", "prefect-worker", POOL}


def workload_pods() -> Iterator[tuple[str, dict[str, Any]]]:
    """Each workload's pod template (metadata and spec), the work pool's flow-run pod included."""
    for obj in objects():
        if obj["kind"] in WORKLOAD_KINDS:
            yield obj["metadata"]["name"], obj["spec"]["template"]
    yield POOL, pool_pod_template()


def workload_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for owner, pod in workload_pods():
        spec = pod["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield f"{owner}/{container['name']}", container


def secret_refs(container: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container.get("env") or []
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def policies() -> list[dict[str, Any]]:
    return [o for o in objects() if o["kind"] == "NetworkPolicy"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is checked here: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def rules(labels: dict[str, str], direction: str) -> list[dict[str, Any]]:
    """The ingress or egress rules of every policy that selects pods with these labels."""
    return [
        rule
        for policy in policies()
        if selects(policy["spec"]["podSelector"], labels)
        and direction.capitalize() in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get(direction, [])
    ]


def opens(rule: dict[str, Any], protocol: str, port: int) -> bool:
    listed = rule.get("ports")
    return not listed or any(
        p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in listed
    )


def namespace_of(peer: dict[str, Any]) -> str | None:
    """The namespace a peer names by `kubernetes.io/metadata.name`; None for this namespace."""
    if "namespaceSelector" not in peer:
        return None
    return peer["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name")


def egress_to_namespace(labels: dict[str, str], namespace: str, port: int) -> bool:
    return any(
        opens(rule, "TCP", port) and any(namespace_of(peer) == namespace for peer in rule["to"])
        for rule in rules(labels, "egress")
    )


def egress_to_addresses(labels: dict[str, str], port: int) -> bool:
    return any(
        opens(rule, "TCP", port) and any("ipBlock" in peer for peer in rule["to"])
        for rule in rules(labels, "egress")
    )


def endpoint(url: str) -> tuple[str, int]:
    """The namespace and port of an in-cluster `<service>.<namespace>.svc[...]:<port>` address."""
    parts = urlsplit(url if "://" in url else f"tcp://{url.split(',')[0]}")
    host, port = parts.hostname or "", parts.port
    labels = host.split(".")
    assert len(labels) >= 3 and labels[2] == "svc" and port, f"not an in-cluster address: {url}"
    return labels[1], port


def pod_labels(owner: str) -> dict[str, str]:
    [pod] = [pod for name, pod in workload_pods() if name == owner]
    return pod["metadata"]["labels"]


def test_no_container_takes_a_whole_secret() -> None:
    for where, container in workload_containers():
        for source in container.get("envFrom", []):
            assert "secretRef" not in source, f"{where}: envFrom a whole Secret"
    for owner, pod in workload_pods():
        volumes = pod["spec"].get("volumes", [])
        assert not [v for v in volumes if "secret" in v], f"{owner} mounts a whole Secret"


def test_each_container_takes_only_the_secret_keys_it_needs() -> None:
    seen = set()
    for where, container in workload_containers():
        secret, keys = NEEDS.get(where, ("", set()))
        assert secret_refs(container) == {(secret, key) for key in keys}, where
        for entry in container.get("env") or []:
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert entry["name"] == ref["key"], f"{where}: {entry['name']} from {ref}"
        seen.add(where)
    assert set(NEEDS) <= seen, f"containers gone: {set(NEEDS) - seen}"


def test_every_secret_holds_only_keys_its_workloads_read() -> None:
    read = {ref for _, container in workload_containers() for ref in secret_refs(container)}
    for obj in load("consumer-keda.yaml"):
        read |= {(r["name"], r["key"]) for r in obj["spec"].get("secretTargetRef", [])}
    example = {(name, key) for name, keys in secrets().items() for key in keys}
    assert read <= example, f"references to keys no Secret has: {read - example}"
    assert example <= read, f"keys no workload reads: {example - read}"
    assert "mmops-secrets" not in secrets(), "the shared Secret of every key is gone"


def test_a_default_deny_policy_fences_the_namespace() -> None:
    assert "network-policy.yaml" in kustomization()["resources"]
    deny = [
        p
        for p in policies()
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, "no policy denies all ingress and egress by default"
    # Only DNS is open to every pod; everything else names its pods.
    for policy in policies():
        if policy["spec"]["podSelector"] == {} and policy not in deny:
            assert set(policy["spec"]["policyTypes"]) == {"Egress"}, policy["metadata"]["name"]
            for rule in policy["spec"]["egress"]:
                assert {p["port"] for p in rule["ports"]} == {53}, policy["metadata"]["name"]


@pytest.mark.parametrize("protocol", ["UDP", "TCP"])
def test_every_pod_resolves_names(protocol: str) -> None:
    for owner, pod in workload_pods():
        labels = pod["metadata"]["labels"]
        assert any(
            opens(rule, protocol, 53)
            and any(namespace_of(peer) == "kube-system" for peer in rule["to"])
            for rule in rules(labels, "egress")
        ), f"{owner}: no DNS over {protocol}"


def test_every_workload_has_its_own_allow_policy_and_every_policy_a_workload() -> None:
    pods = dict(workload_pods())
    for owner, pod in pods.items():
        labels = pod["metadata"]["labels"]
        own = [
            p
            for p in policies()
            if p["spec"]["podSelector"] and selects(p["spec"]["podSelector"], labels)
        ]
        assert own, f"{owner}: no network policy selects its pods {labels}"
        assert all(set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} for p in own), owner
    for policy in policies():
        selector = policy["spec"]["podSelector"]
        if selector:
            assert any(selects(selector, pod["metadata"]["labels"]) for pod in pods.values()), (
                f"{policy['metadata']['name']} selects no workload"
            )


def test_workloads_reach_the_endpoints_config_names() -> None:
    config = find("ConfigMap", "mmops-env")["data"]
    for owner, variables in REACHES.items():
        labels = pod_labels(owner)
        for variable in variables:
            namespace, port = endpoint(config[variable])
            assert egress_to_namespace(labels, namespace, port), f"{owner} cannot reach {variable}"


def test_only_https_workloads_leave_the_cluster() -> None:
    for owner, pod in workload_pods():
        labels = pod["metadata"]["labels"]
        addresses = [
            peer["ipBlock"]
            for rule in rules(labels, "egress")
            for peer in rule["to"]
            if "ipBlock" in peer
        ]
        if owner in HTTPS_OUT:
            assert egress_to_addresses(labels, 443), f"{owner}: no HTTPS out"
        else:
            assert not addresses, f"{owner} may leave the cluster: {addresses}"
    # The worker talks to the API server (443 or 6443 behind the `kubernetes` Service).
    assert egress_to_addresses(pod_labels("prefect-worker"), 6443)


def test_only_prometheus_reaches_the_consumer_and_only_its_metrics_port() -> None:
    consumer = find("Deployment", "mmops-serve")
    labels = consumer["spec"]["template"]["metadata"]["labels"]
    [container] = consumer["spec"]["template"]["spec"]["containers"]
    [metrics] = [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"]
    ingress = rules(labels, "ingress")
    assert ingress
    for rule in ingress:
        assert [p["port"] for p in rule["ports"]] == [metrics]
        for peer in rule["from"]:
            assert "ipBlock" not in peer and namespace_of(peer) and peer.get("podSelector")


def test_no_policy_lets_everyone_in() -> None:
    for policy in policies():
        for rule in policy["spec"].get("ingress", []):
            name = policy["metadata"]["name"]
            assert rule.get("from"), f"{name}: an ingress rule without `from` admits every source"
            for peer in rule["from"]:
                assert "ipBlock" not in peer, f"{name}: ingress from addresses"
                assert peer != {}, f"{name}: an empty peer admits every pod"


def test_training_pods_reach_each_other_on_every_port() -> None:
    """The c10d rendezvous on the Service's port, then NCCL on ports it picks itself."""
    job = find("Job", "mmops-train")
    labels = job["spec"]["template"]["metadata"]["labels"]
    [service] = [o for o in load("train-job.yaml") if o["kind"] == "Service"]
    for direction, key in (("ingress", "from"), ("egress", "to")):
        peers = [
            rule
            for rule in rules(labels, direction)
            if not rule.get("ports")
            and any(
                namespace_of(peer) is None and selects(peer.get("podSelector", {}), labels)
                for peer in rule[key]
                if "podSelector" in peer
            )
        ]
        assert peers, f"training pods: no {direction} among themselves on every port"
    assert all(p["port"] for p in service["spec"]["ports"])


def test_consumer_probes_read_healthz_and_readyz_on_the_metrics_port() -> None:
    """/metrics answers from its own thread even while the serving loop is stuck; /healthz not,
    and /readyz also waits for a model to serve."""
    consumer = find("Deployment", "mmops-serve")
    [container] = consumer["spec"]["template"]["spec"]["containers"]
    ports = {p["name"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] == "metrics" in ports, probe
