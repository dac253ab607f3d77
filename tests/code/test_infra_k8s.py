"""infra/k8s agrees with the CLI, params.yaml, mmops.environment, Prefect and itself."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from mmops_command import mmops_command_error

from mmops.config import load_params
from mmops.environment import LIBRARY_VARIABLES, VARIABLES

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra/k8s"
GPU_IMAGE = "ghcr.io/mmops/mmops-gpu:0.1.0"
# The lean image of `mmops serve-http` (infra/docker/Dockerfile.serve): no torch.
SERVE_IMAGE = "ghcr.io/mmops/mmops-serve:0.1.0"
IMAGES = {"ghcr.io/mmops/mmops:0.1.0", GPU_IMAGE, SERVE_IMAGE}
GPU = "nvidia.com/gpu"
# Applied by hand, never by `kubectl apply -k`: a template, a one-off run, a KEDA add-on.
OPTIONAL = {"secret.example.yaml", "train-job.yaml", "consumer-keda.yaml"}
POOL = "prefect-gpu-pool.json"
SHELL_OPERATORS = {"&&", "||", ";", "|"}


@cache
def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc is not None]


def manifest_files() -> list[str]:
    return sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def objects(files: list[str] | None = None) -> list[dict[str, Any]]:
    return [doc for name in files or manifest_files() for doc in load(name)]


def find(kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def pool_template() -> dict[str, Any]:
    return json.loads((K8S / POOL).read_text())


def pool_pod_spec() -> dict[str, Any]:
    """The flow-run pod of the `gpu` work pool, with its variables at their defaults."""
    template = pool_template()
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        if isinstance(node, str) and (m := re.fullmatch(r"\{\{ (\w+) \}\}", node)):
            return defaults.get(m.group(1))
        return node

    return fill(template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"])


def pool_pod_template() -> dict[str, Any]:
    """The flow-run pod template of the `gpu` work pool: its metadata and spec."""
    return pool_template()["job_configuration"]["job_manifest"]["spec"]["template"]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objects():
        if obj["kind"] in ("Deployment", "Job"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]
    yield POOL, pool_pod_spec()


def containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for owner, spec in pod_specs():
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield f"{owner}/{container['name']}", container


def argv(container: dict[str, Any]) -> list[list[str]]:
    """The container's command lines: its argv, or each line of an `sh -c` script."""
    words = [*container.get("command", []), *container.get("args", [])]
    if words[:1] in (["sh"], ["bash"]) and words[1].startswith("-") and "c" in words[1]:
        return [shlex.split(line) for line in words[2].splitlines() if line.strip()]
    return [words]


def mmops_invocations(words: list[str]) -> Iterator[list[str]]:
    """`mmops SUB ...` within a command line, up to a shell operator."""
    for i, word in enumerate(words):
        if Path(word).name == "mmops":
            rest = words[i + 1 :]
            end = next((j for j, w in enumerate(rest) if w in SHELL_OPERATORS), len(rest))
            yield rest[:end]


def option_value(words: list[str], option: str) -> str | None:
    for i, word in enumerate(words):
        if word == option:
            return words[i + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    return None


def only_container(obj: dict[str, Any]) -> dict[str, Any]:
    [container] = obj["spec"]["template"]["spec"]["containers"]
    return container


def topic_partitions() -> int:
    [line] = argv(only_container(find("Job", "mmops-topics")))
    [invocation] = mmops_invocations(line)
    assert invocation[0] == "topics"
    return int(option_value(invocation, "--partitions") or load_params(None).stream.partitions)


def is_secret_name(name: str) -> bool:
    description = {**VARIABLES, **LIBRARY_VARIABLES}.get(name, "")
    return "(a secret)" in description or bool(
        re.search(r"PASSWORD|SECRET|TOKEN|API_KEY|AUTH_STRING", name)
    )


def secrets() -> dict[str, dict[str, str]]:
    """The keys and placeholders of each Secret in secret.example.yaml, by name."""
    return {s["metadata"]["name"]: s["stringData"] for s in load("secret.example.yaml")}


def test_every_manifest_parses_and_names_its_object() -> None:
    assert manifest_files(), "no manifests in infra/k8s"
    for name in manifest_files():
        docs = load(name)
        assert docs, f"{name} is empty"
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), f"{name}: {doc}"
            assert doc.get("metadata", {}).get("name"), f"{name}: a {doc['kind']} without a name"
    json.loads((K8S / POOL).read_text())


def test_kustomization_lists_exactly_the_base_files() -> None:
    spec = kustomization()
    resources = spec["resources"]
    assert len(resources) == len(set(resources))
    assert set(resources) == set(manifest_files()) - OPTIONAL
    generated = {
        item.split("=")[-1] for g in spec.get("configMapGenerator", []) for item in g["files"]
    }
    for name in generated:
        assert (K8S / name).is_file(), f"configMapGenerator names a missing file {name}"
    accounted = {*resources, *OPTIONAL, *generated, "kustomization.yaml", "README.md"}
    assert {p.name for p in K8S.iterdir()} == accounted, "a file in infra/k8s nothing uses"


def test_hand_applied_manifests_name_the_namespace() -> None:
    namespace = kustomization()["namespace"]
    assert [o["metadata"]["name"] for o in objects() if o["kind"] == "Namespace"] == [namespace]
    for obj in objects(sorted(OPTIONAL)):
        assert obj["metadata"].get("namespace") == namespace, obj["metadata"]["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomization_builds_into_the_namespace() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    built = [doc for doc in yaml.safe_load_all(out) if doc]
    assert {o["kind"] for o in built} >= {"Deployment", "Job", "ConfigMap", "Role"}
    for obj in built:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == kustomization()["namespace"]
    assert "Secret" not in {o["kind"] for o in built}, "a Secret must never be applied from git"


def test_every_container_runs_a_real_mmops_command() -> None:
    seen = 0
    for where, container in containers():
        if where.startswith(POOL):
            continue  # the worker fills in `prefect flow-run execute`
        # The images' CMD is `mmops --help`: every container must say what it runs.
        assert container.get("command"), f"{where} has no command"
        for line in argv(container):
            for args in mmops_invocations(line):
                seen += 1
                error = mmops_command_error(args)
                assert error is None, f"{where}: {error}"
    assert seen >= 3, "expected the topics, serve and training commands"


def test_prefect_worker_polls_the_deployments_pool() -> None:
    spec = yaml.safe_load((ROOT / "infra/prefect/prefect.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in spec["deployments"]}
    [line] = argv(only_container(find("Deployment", "prefect-worker")))
    assert line[:3] == ["prefect", "worker", "start"]
    assert {option_value(line, "--pool")} == pools
    assert option_value(line, "--type") == "kubernetes"


def test_prefect_worker_mounts_its_template_and_settings() -> None:
    worker = find("Deployment", "prefect-worker")
    pod, container = worker["spec"]["template"]["spec"], only_container(worker)
    [line] = argv(container)
    [generator] = [
        g for g in kustomization()["configMapGenerator"] if g["name"] == "prefect-worker"
    ]
    keys = {item.split("=")[0]: item.split("=")[-1] for item in generator["files"]}
    [volume] = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "prefect-worker"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    template = Path(option_value(line, "--base-job-template") or "")
    assert template.parent == Path(mount["mountPath"]) and keys.get(template.name) == POOL
    # Prefect reads prefect.toml from the working directory.
    assert container["workingDir"] == mount["mountPath"] and keys.get("prefect.toml")
    settings = tomllib.loads((K8S / keys["prefect.toml"]).read_text())
    k8s = settings["integrations"]["kubernetes"]
    assert k8s["observer"]["namespaces"] == [kustomization()["namespace"]]
    # Flow-run Jobs reference the worker's Prefect credentials where the worker reads them.
    worker_refs = {
        (e["name"], e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    for setting, name in (
        ("api_key", "PREFECT_API_KEY"),
        ("api_auth_string", "PREFECT_API_AUTH_STRING"),
    ):
        secret, key = (
            k8s["worker"][f"{setting}_secret_name"],
            k8s["worker"][f"{setting}_secret_key"],
        )
        assert (name, secret, key) in worker_refs and key in secrets()[secret], setting


def test_prefect_worker_role_covers_the_jobs_it_manages() -> None:
    worker = find("Deployment", "prefect-worker")
    account = worker["spec"]["template"]["spec"]["serviceAccountName"]
    assert find("ServiceAccount", account)
    binding = find("RoleBinding", "prefect-worker")
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    role = find(binding["roleRef"]["kind"], binding["roleRef"]["name"])
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")}
    needed |= {("", "pods", v) for v in ("get", "list", "watch")}
    needed |= {("", "pods/log", "get"), ("", "events", "list"), ("", "events", "watch")}
    assert needed <= granted, needed - granted
    assert not any("*" in item for item in granted), "wildcards grant more than the worker needs"


def test_work_pool_template_runs_flows_on_a_gpu_in_the_namespace() -> None:
    template = pool_template()
    variables = template["variables"]["properties"]
    used = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert used <= set(variables), f"placeholders without a variable: {used - set(variables)}"
    assert variables["namespace"]["default"] == kustomization()["namespace"]
    assert variables["image"]["default"] == GPU_IMAGE
    [container] = pool_pod_spec()["containers"]
    assert container["image"] == GPU_IMAGE and container["resources"]["limits"][GPU] >= 1
    assert container["envFrom"] == [{"configMapRef": {"name": "mmops-env"}}]


def test_work_pool_template_renders_with_prefect_kubernetes() -> None:
    """The worker's own validation (it rejects a template missing fields it expects)."""
    worker = pytest.importorskip("prefect_kubernetes.worker")
    import asyncio
    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Any API URL: rendering needs no server, but without one Prefect starts a temporary one.
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        config = asyncio.run(
            worker.KubernetesWorkerJobConfiguration.from_template_and_values(
                pool_template(), {"gpu_count": 2, "env": {"MLFLOW_TRACKING_URI": "http://m"}}
            )
        )
        config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="run"))
    pod = config.job_manifest["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["image"] == GPU_IMAGE and container["resources"]["limits"][GPU] == 2
    # The worker puts its variables before the template's secret references and keeps both.
    env = {e["name"]: e for e in container["env"]}
    assert env["PREFECT_API_URL"]["value"] and env["MLFLOW_TRACKING_URI"]["value"] == "http://m"
    for entry in pool_pod_spec()["containers"][0]["env"]:
        assert env[entry["name"]] == entry
    # Its network policy selects the pod by this label, which Prefect's own labels leave alone.
    expected = pool_pod_template()["metadata"]["labels"]["app.kubernetes.io/name"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == expected


def test_consumers_do_not_outnumber_the_partitions() -> None:
    partitions = topic_partitions()
    consumer = find("Deployment", "mmops-serve")
    assert 1 <= consumer["spec"]["replicas"] <= partitions
    for obj in load("consumer-keda.yaml") if (K8S / "consumer-keda.yaml").exists() else []:
        if obj["kind"] == "ScaledObject":
            assert obj["spec"]["scaleTargetRef"]["name"] == consumer["metadata"]["name"]
            assert obj["spec"]["minReplicaCount"] <= obj["spec"]["maxReplicaCount"] <= partitions
            stream = load_params(ROOT / "params.yaml").stream
            [trigger] = obj["spec"]["triggers"]
            assert trigger["metadata"]["consumerGroup"] == stream.group_id
            assert trigger["metadata"]["topic"] == stream.input_topic
            assert trigger["metadata"]["offsetResetPolicy"] == stream.auto_offset_reset


def test_consumer_metrics_and_disruptions() -> None:
    consumer = find("Deployment", "mmops-serve")
    pod = consumer["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert consumer["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [line] = argv(only_container(consumer))
    [invocation] = mmops_invocations(line)
    assert invocation[0] == "serve"
    port = (
        int(option_value(invocation, "--metrics-port") or 0)
        or load_params(ROOT / "params.yaml").stream.metrics_port
    )
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert {"name": "metrics", "containerPort": port} in only_container(consumer)["ports"]
    service = find("Service", "mmops-serve-metrics")
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
    budget = find("PodDisruptionBudget", "mmops-serve")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # SIGTERM finishes the batch, commits and leaves the group: more than Kubernetes' default 30 s.
    assert pod["spec"]["terminationGracePeriodSeconds"] > 30


def test_torchrun_job_matches_its_rendezvous_service() -> None:
    from torch.distributed.run import get_args_parser

    job = find("Job", "mmops-train")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    [line] = argv(only_container(job))
    assert line[0] == "torchrun"
    run = get_args_parser().parse_args(line[1:])
    assert spec["completionMode"] == "Indexed"
    assert int(run.nnodes) == spec["completions"] == spec["parallelism"]
    assert run.rdzv_backend == "c10d"
    host, port = run.rdzv_endpoint.split(":")
    service = find("Service", pod["subdomain"])
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert service["spec"]["clusterIP"] == "None"
    assert (
        service["spec"]["selector"].items()
        <= {"batch.kubernetes.io/job-name": job["metadata"]["name"]}.items()
    )
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert int(run.nproc_per_node) == int(only_container(job)["resources"]["limits"][GPU])
    assert [run.training_script, *run.training_script_args][:2] == ["mmops", "train"]
    assert run.no_python


def test_training_pulls_the_dataset_it_trains_on() -> None:
    job = find("Job", "mmops-train")
    pod = job["spec"]["template"]["spec"]
    [init], train = pod["initContainers"], only_container(job)
    pulls = [w for w in argv(init) if w[:2] == ["dvc", "pull"]]
    [pull] = pulls
    remotes = re.findall(r"\['remote \"([^\"]+)\"'\]", (ROOT / ".dvc/config").read_text())
    assert option_value(pull, "--remote") in remotes
    data_dir = load_params(ROOT / "params.yaml").data.dir
    assert pull[-1] == data_dir
    [mount] = [m for m in init["volumeMounts"] if m["mountPath"] == "/workspace"]
    assert mount in train["volumeMounts"]
    [invocation] = mmops_invocations(argv(train)[0])
    assert option_value(invocation, "--data") == f"{mount['mountPath']}/{data_dir}"
    volumes = {v["name"]: v for v in pod["volumes"]}
    [shm] = [m for m in train["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"


def test_gpu_work_runs_on_gpu_nodes_with_the_gpu_image() -> None:
    gpu_pods = 0
    for owner, spec in pod_specs():
        wants_gpu = False
        for container in spec["containers"]:
            limits = container.get("resources", {}).get("limits", {})
            uses_gpu_image = container["image"] == GPU_IMAGE
            assert uses_gpu_image == (GPU in limits), f"{owner}/{container['name']}"
            wants_gpu |= GPU in limits
        if wants_gpu:
            gpu_pods += 1
            assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec.get(
                "tolerations", []
            ), f"{owner} cannot schedule on tainted GPU nodes"
    assert gpu_pods >= 2, "the training Job and the flow-run template"


def test_images_are_the_mmops_images() -> None:
    for where, container in containers():
        assert container["image"] in IMAGES, f"{where}: {container['image']}"


def test_env_names_are_declared_in_mmops_environment() -> None:
    known = VARIABLES.keys() | LIBRARY_VARIABLES.keys()
    names = {(where, e["name"]) for where, c in containers() for e in c.get("env") or []}
    names |= {("ConfigMap mmops-env", k) for k in find("ConfigMap", "mmops-env")["data"]}
    names |= {(f"Secret {name}", k) for name, keys in secrets().items() for k in keys}
    unknown = sorted(f"{where}: {name}" for where, name in names if name not in known)
    assert not unknown, unknown


def test_env_references_resolve_to_config_and_secret_keys() -> None:
    sources = {
        "configMapKeyRef": {"mmops-env": find("ConfigMap", "mmops-env")["data"]},
        "secretKeyRef": secrets(),
    }
    refs = [
        (where, kind, ref)
        for where, c in containers()
        for e in c.get("env") or []
        for kind, ref in e.get("valueFrom", {}).items()
    ]
    for obj in load("consumer-keda.yaml"):
        for trigger in obj["spec"].get("triggers", []):
            for key, value in trigger["metadata"].items():
                if key.endswith("FromEnv"):  # KEDA reads these from the target's environment
                    refs.append(("keda", "configMapKeyRef", {"name": "mmops-env", "key": value}))
        for ref in obj["spec"].get("secretTargetRef", []):
            refs.append(("keda", "secretKeyRef", ref))
    assert refs
    for where, kind, ref in refs:
        assert ref["key"] in sources[kind].get(ref["name"], {}), f"{where}: {kind} {ref}"


def test_secrets_never_appear_as_literal_values() -> None:
    assert is_secret_name("KAFKA_SASL_PASSWORD") and not is_secret_name("AWS_ACCESS_KEY_ID")
    assert is_secret_name("PREFECT_API_AUTH_STRING")
    for where, container in containers():
        for entry in container.get("env") or []:
            if is_secret_name(entry["name"]):
                assert "value" not in entry, f"{where}: {entry['name']} is a literal"
                assert "secretKeyRef" in entry["valueFrom"], f"{where}: {entry['name']}"
        for ref in container.get("envFrom", []):
            assert set(ref) <= {"configMapRef", "secretRef"}
    config = find("ConfigMap", "mmops-env")["data"]
    assert not [k for k in config if is_secret_name(k)], "a secret in the ConfigMap"
    assert not [
        o for o in objects(sorted(set(manifest_files()) - OPTIONAL)) if o["kind"] == "Secret"
    ]
    for name, keys in secrets().items():
        for key, value in keys.items():
            if is_secret_name(key):
                assert value == "CHANGE-ME", f"secret.example.yaml: {name} {key} holds a value"


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    namespace = find("Namespace", kustomization()["namespace"])
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for owner, spec in pod_specs():
        context = spec["securityContext"]
        assert context["runAsNonRoot"] and context["runAsUser"] == 10001, owner
        assert context["seccompProfile"]["type"] == "RuntimeDefault", owner
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{owner}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where} mounts an undeclared volume"
            for ref in container.get("envFrom", []):
                assert ref == {"configMapRef": {"name": "mmops-env"}}, where
