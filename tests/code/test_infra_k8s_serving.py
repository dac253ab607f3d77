"""infra/k8s/serving-http.yaml: the Open Inference Protocol v2 server's Deployment, Service,
autoscaler and network policy agree with the protocol's routes, the command's ports and each
other."""

from __future__ import annotations

from functools import cache
from typing import Any

from mmops_command import mmops_command_error
from test_infra_k8s import (
    ROOT,
    SERVE_IMAGE,
    argv,
    find,
    kustomization,
    load,
    mmops_invocations,
    only_container,
    option_value,
)
from test_infra_k8s_security import namespace_of, opens, rules

from mmops.config import load_params

NAME = "mmops-serve-http"
MANIFEST = "serving-http.yaml"
# The Open Inference Protocol v2 (KServe v2) routes the probes and scrapes rely on.
PROTOCOL_ROUTES = {"/v2/health/live", "/v2/health/ready", "/v2/models/{name}/infer", "/metrics"}
PROBES = {
    "startupProbe": "/v2/health/live",
    "readinessProbe": "/v2/health/ready",
    "livenessProbe": "/v2/health/live",
}


@cache
def served_routes() -> set[str]:
    """The paths the real REST app of `mmops serve-http` routes (no model, nothing served)."""
    from mmops.serving.oip.http import RestApi

    limits = {"max_body_bytes": 1, "request_timeout_s": 1}
    api = RestApi(service=None, metrics=None, limits=limits, problem=lambda: None)  # type: ignore[arg-type]
    return {route.path for route in api.app().routes}


def deployment() -> dict[str, Any]:
    return find("Deployment", NAME)


def pod_labels() -> dict[str, str]:
    return deployment()["spec"]["template"]["metadata"]["labels"]


def invocation() -> list[str]:
    [line] = argv(only_container(deployment()))
    [args] = mmops_invocations(line)
    return args


def container_ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in only_container(deployment())["ports"]}


def test_the_server_routes_the_protocol_paths_the_manifests_use() -> None:
    assert served_routes() >= PROTOCOL_ROUTES | set(PROBES.values())


def test_the_server_is_part_of_the_base_and_runs_the_serve_image() -> None:
    assert MANIFEST in kustomization()["resources"]
    assert only_container(deployment())["image"] == SERVE_IMAGE
    assert {o["kind"] for o in load(MANIFEST)} >= {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
    }
    for obj in load(MANIFEST):
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == NAME, obj["kind"]


def test_serve_http_command_parses_against_the_cli() -> None:
    """Waits for `mmops serve-http`: fails until the command exists."""
    args = invocation()
    assert args[0] == "serve-http"
    error = mmops_command_error(args)
    assert error is None, error


def test_the_server_follows_the_registered_champion() -> None:
    registered = load_params(ROOT / "params.yaml").tracking.registered_model
    assert option_value(invocation(), "--model") == f"models:/{registered}@champion"
    # Listening on every interface of the pod, or the kubelet's probes and the Service miss it.
    assert option_value(invocation(), "--host") == "0.0.0.0"


def test_container_ports_are_the_ports_the_command_listens_on() -> None:
    args = invocation()
    ports = container_ports()
    assert ports == {
        "http": int(option_value(args, "--port") or 0),
        "grpc": int(option_value(args, "--grpc-port") or 0),
    }
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ports["http"])
    assert annotations["prometheus.io/path"] in served_routes()


def test_probes_read_the_v2_health_routes_on_the_http_port() -> None:
    container = only_container(deployment())
    for probe, path in PROBES.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in served_routes(), probe
        assert get["port"] == "http" and "http" in container_ports(), probe
    # The startup probe covers the champion's download before liveness may restart the pod.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_the_service_exposes_rest_and_grpc_to_the_servers_pods() -> None:
    service = find("Service", NAME)
    assert service["spec"]["selector"].items() <= pod_labels().items()
    assert deployment()["spec"]["selector"]["matchLabels"].items() <= pod_labels().items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"http", "grpc"}
    for name, port in ports.items():
        assert port["targetPort"] == name and port["port"] == container_ports()[name], name
    assert ports["grpc"]["appProtocol"] == "grpc"


def test_the_autoscaler_scales_the_deployment_on_cpu() -> None:
    hpa = find("HorizontalPodAutoscaler", NAME)
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME}
    assert 2 <= spec["minReplicas"] < spec["maxReplicas"]
    [metric] = spec["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    target = metric["resource"]["target"]
    assert target["type"] == "Utilization" and 0 < target["averageUtilization"] <= 90
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 120
    # The HPA owns the replicas: an apply must not reset them.
    assert "replicas" not in deployment()["spec"]
    # Utilisation is a share of the request: without one the HPA cannot compute it.
    resources = only_container(deployment())["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]


def test_onnx_threads_match_the_cpu_request() -> None:
    overrides = [
        word for i, word in enumerate(invocation()) if i and invocation()[i - 1] == "--set"
    ]
    threads = load_params(ROOT / "params.yaml", overrides).predict.threads
    cpu = only_container(deployment())["resources"]["requests"]["cpu"]
    assert threads == int(cpu), "pin predict.threads to the CPU request"


def test_rollouts_and_drains_keep_a_server_up() -> None:
    spec = deployment()["spec"]
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = find("PodDisruptionBudget", NAME)
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels().items()
    assert (
        budget["spec"]["maxUnavailable"]
        < find("HorizontalPodAutoscaler", NAME)["spec"]["minReplicas"]
    )
    pod = spec["template"]["spec"]
    [sleep, seconds] = only_container(deployment())["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep" and int(seconds) < pod["terminationGracePeriodSeconds"]


def test_only_prometheus_and_clients_reach_the_server_and_only_on_its_ports() -> None:
    ports = container_ports()
    ingress = rules(pod_labels(), "ingress")
    assert ingress
    for rule in ingress:
        listed = {p["port"] for p in rule["ports"]}
        assert listed <= set(ports.values()), listed
        for peer in rule["from"]:
            # Named pods only: never whole namespaces or address ranges.
            assert "ipBlock" not in peer and peer.get("podSelector", {}).get("matchLabels"), peer
    prometheus = [
        rule for rule in ingress if any(namespace_of(peer) == "monitoring" for peer in rule["from"])
    ]
    assert prometheus and all(opens(r, "TCP", ports["http"]) for r in prometheus)
    assert any(opens(r, "TCP", ports["grpc"]) for r in ingress), "no client reaches gRPC"
