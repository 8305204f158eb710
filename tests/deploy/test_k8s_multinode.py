"""deploy/k8s-multinode: one model sharded over the 2 pods of a LeaderWorkerSet group (torchrun, TP=2).

The LeaderWorkerSet is checked against a JSON schema of the LWS API's fields (leaderworkerset_v1_schema.json,
written from the LWS Go types) and its pod templates by kubernetes-validate as PodTemplate objects; the
overlay, as `kubectl kustomize` builds it, against the Kubernetes schema (strict). The command line agrees
with itself: torchrun's own parser reads the group size, node rank and leader address LWS injects, and the
server's own parser reads the `steerserve serve` flags behind it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.helpers import DEPLOY, K8S, parse_serve_flags, tool, yaml_documents

MULTINODE = DEPLOY / "k8s-multinode"
SCHEMA = Path(__file__).with_name("leaderworkerset_v1_schema.json")
(LWS,) = yaml_documents(MULTINODE / "leaderworkerset.yaml")
GROUP = LWS["spec"]["leaderWorkerTemplate"]
TEMPLATES = {"leader": GROUP["leaderTemplate"], "worker": GROUP["workerTemplate"]}
NAMESPACE = yaml.safe_load((MULTINODE / "kustomization.yaml").read_text())["namespace"]
# the labels the LWS controller puts on every pod of a group (api/leaderworkerset/v1: SetNameLabelKey,
# WorkerIndexLabelKey); the leader's worker index is always 0
LWS_NAME_LABEL, WORKER_INDEX_LABEL = (
    "leaderworkerset.sigs.k8s.io/name",
    "leaderworkerset.sigs.k8s.io/worker-index",
)
VERSIONS = ["1.30.0", "1.37.0"]


def container(role: str) -> dict:
    (only,) = TEMPLATES[role]["spec"]["containers"]
    return only


def pod_labels(role: str, index: int) -> dict[str, str]:
    """A pod's labels once the LWS controller created it."""
    labels = dict(TEMPLATES[role]["metadata"]["labels"])
    return {**labels, LWS_NAME_LABEL: LWS["metadata"]["name"], WORKER_INDEX_LABEL: str(index)}


def config_data() -> dict[str, str]:
    """The ConfigMap the overlay ends with: deploy/k8s's, with patches/config.yaml merged in."""
    (base,) = yaml_documents(K8S / "configmap.yaml")
    (patch,) = yaml_documents(MULTINODE / "patches" / "config.yaml")
    assert patch["metadata"]["name"] == base["metadata"]["name"]
    return {**base["data"], **patch["data"]}


def pod_env(role: str, index: int) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: what LWS injects, the ConfigMap, then `env` in
    order with `$(VAR)` expanded from what precedes, secret values read from deploy/k8s's Secret."""
    (secret,) = yaml_documents(K8S / "secret.yaml")
    lws = LWS["metadata"]["name"]
    env = {
        # the leader pod's DNS name through the headless Service the controller creates (group 0)
        "LWS_LEADER_ADDRESS": f"{lws}-0.{lws}.{NAMESPACE}",
        "LWS_GROUP_SIZE": str(GROUP["size"]),
        "LWS_WORKER_INDEX": str(index),
    }
    spec = container(role)
    for source in spec["envFrom"]:
        assert source["configMapRef"]["name"] == "steerserve-config"
        env.update(config_data())
    for item in spec["env"]:
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], ref
            env[item["name"]] = secret["stringData"][ref["key"]]
        else:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
    return env


def command_line(role: str, index: int) -> list[str]:
    env = pod_env(role, index)
    spec = container(role)
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in spec["command"] + spec["args"]]


def as_pod_template(role: str) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"steerserve-tp-{role}"},
            "template": TEMPLATES[role]}  # fmt: skip


def test_leaderworkerset_has_only_fields_of_the_lws_api():
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(LWS, schema)
    broken = json.loads(json.dumps(LWS))
    broken["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"  # the schema can fail
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("role", sorted(TEMPLATES))
def test_pod_templates_validate_against_the_kubernetes_schema(role, version):
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed: the schema check did NOT run"
    )
    kv.validate(as_pod_template(role), version, strict=True)


@pytest.mark.parametrize("index", [0, 1])
def test_torchrun_and_the_server_flags_agree_with_the_group(index):
    from torch.distributed.run import get_args_parser

    role = "leader" if index == 0 else "worker"
    command = command_line(role, index)
    assert command[0] == "torchrun"
    run = get_args_parser().parse_args(command[1:])
    size = GROUP["size"]
    assert (run.nnodes, run.nproc_per_node, run.node_rank) == (str(size), "1", index)
    assert run.master_addr == pod_env(role, index)["LWS_LEADER_ADDRESS"] and run.rdzv_backend == "static"
    assert (run.module, run.training_script, run.training_script_args[0]) == (True, "steerserve.cli", "serve")
    config = parse_serve_flags(run.training_script_args[1:])  # fails on a flag the server lacks
    assert config.parallel.tensor_parallel_size == size == 2  # WORLD_SIZE = nnodes x 1 must equal -tp
    assert config.parallel.distributed_timeout_s == float(config_data()["STEERSERVE_DISTRIBUTED_TIMEOUT_S"])
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8000)
    assert config.model.model == "random:llama"  # Llama-shaped: GPT-2 cannot be sharded
    assert (
        config.registry.registry_url
        == "postgresql://steerserve:change-me-postgres@steerserve-postgres:5432/steerserve"
    )
    assert pod_env(role, index)["STEERSERVE_DATA_DIR"] == "/data"


def test_every_rank_runs_the_same_command_and_only_the_leader_serves_http():
    leader, worker = container("leader"), container("worker")
    assert command_line("leader", 0)[1:4] != command_line("worker", 1)[1:4]  # node rank differs ...
    for key in ("image", "command", "args", "envFrom", "env", "volumeMounts", "securityContext", "resources"):
        assert leader[key] == worker[key], key  # ... and nothing else
    assert TEMPLATES["leader"]["spec"]["volumes"] == TEMPLATES["worker"]["spec"]["volumes"]
    ports = {p["name"]: p["containerPort"] for p in leader["ports"]}
    assert ports["http"] == 8000 and ports["rendezvous"] == int(
        next(a.split("=")[1] for a in leader["args"] if a.startswith("--master-port="))
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert (leader[probe]["httpGet"]["path"], leader[probe]["httpGet"]["port"]) == ("/health", "http")
        assert probe not in worker  # rank 1 runs no HTTP server: a probe would kill it
    assert "ports" not in worker
    annotations = TEMPLATES["leader"]["metadata"]["annotations"]
    assert (
        annotations["prometheus.io/port"] == "8000" and "annotations" not in TEMPLATES["worker"]["metadata"]
    )


def test_the_group_starts_and_restarts_as_one():
    assert GROUP["size"] == 2
    assert GROUP["restartPolicy"] == "RecreateGroupOnPodRestart"  # a lost rank takes its group down
    assert LWS["spec"]["startupPolicy"] == "LeaderCreated"  # the leader is ready only once workers joined
    startup = container("leader")["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.fixture(scope="module")
def built() -> list[dict]:
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: `kubectl kustomize deploy/k8s-multinode` did NOT run")
    out = subprocess.run([*kubectl, "kustomize", str(MULTINODE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def named(docs: list[dict], kind: str, name: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_the_built_overlay_validates_against_the_kubernetes_schema(built, version):
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed: the schema check did NOT run"
    )
    for doc in built:
        if doc["kind"] != "LeaderWorkerSet":
            kv.validate(doc, version, strict=True)
    assert all(d["metadata"].get("namespace") == NAMESPACE for d in built if d["kind"] != "Namespace")


def test_the_overlay_replaces_the_replicas_and_points_service_and_hpa_at_the_leaders(built):
    kinds = {d["kind"] for d in built}
    assert "Deployment" not in kinds and "PodDisruptionBudget" not in kinds
    assert {"LeaderWorkerSet", "Service", "HorizontalPodAutoscaler", "StatefulSet", "Secret",
            "PersistentVolumeClaim"} <= kinds  # fmt: skip
    assert named(built, "LeaderWorkerSet", "steerserve-tp")["spec"] == LWS["spec"]
    selector = named(built, "Service", "steerserve")["spec"]["selector"]
    assert selector.items() <= pod_labels("leader", 0).items()
    assert not selector.items() <= pod_labels("worker", 1).items()
    # the controller creates a headless Service named after the LeaderWorkerSet: no name may clash
    assert LWS["metadata"]["name"] not in {d["metadata"]["name"] for d in built if d["kind"] == "Service"}
    target = named(built, "HorizontalPodAutoscaler", "steerserve")["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": LWS["apiVersion"], "kind": "LeaderWorkerSet", "name": "steerserve-tp"}
    assert named(built, "ConfigMap", "steerserve-config")["data"] == config_data()
    pvc = named(built, "PersistentVolumeClaim", "steerserve-blobs")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every rank of every group reads the blobs
    for role in TEMPLATES:
        volumes = {v["name"]: v for v in TEMPLATES[role]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container(role)["volumeMounts"]}
        assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "steerserve-blobs"
