"""deploy/k8s: every manifest validates against the Kubernetes schema (kubernetes-validate, strict),
and the pieces agree: probes on /health at the container's port, selectors, the HPA's metric and the
prometheus-adapter rule, secret and config keys, the shared ReadWriteMany blob volume, server flags."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.helpers import K8S, ROOT, parse_serve_flags, yaml_documents

FILES = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
DOCS = [doc for path in FILES for doc in yaml_documents(path)]
BY_KIND: dict[str, list[dict]] = {}
for _doc in DOCS:
    BY_KIND.setdefault(_doc["kind"], []).append(_doc)


def one(kind: str, name: str | None = None) -> dict:
    found = [d for d in BY_KIND.get(kind, []) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: found {len(found)}"
    return found[0]


DEPLOYMENT = one("Deployment", "steerserve")
POD = DEPLOYMENT["spec"]["template"]
CONTAINER = POD["spec"]["containers"][0]


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schema(path, version):
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed: the schema check did NOT run"
    )
    for doc in yaml_documents(path):
        kv.validate(doc, version, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in FILES)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "Secret",
            "StatefulSet", "PersistentVolumeClaim"} <= set(BY_KIND)  # fmt: skip


def test_probes_hit_health_on_the_container_port():
    ports = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}
    assert ports == {"http": 8000}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = CONTAINER[probe]["httpGet"]
        assert (get["path"], get["port"]) == ("/health", "http"), probe
    startup = CONTAINER["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # room to load a model
    annotations = POD["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8000" and annotations["prometheus.io/path"] == "/metrics"


def test_selectors_and_targets_agree():
    labels = POD["metadata"]["labels"]
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one("Service", "steerserve")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < DEPLOYMENT["spec"]["replicas"]
    target = one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "steerserve")


def test_hpa_scales_on_the_waiting_queue_through_the_adapter_rule():
    hpa = one("HorizontalPodAutoscaler")["spec"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    rules = yaml.safe_load(one("ConfigMap", "steerserve-prometheus-adapter-rules")["data"]["config.yaml"])
    (rule,) = rules["rules"]
    series = rule["seriesQuery"].split("{")[0]
    assert series == "steerserve:num_requests_waiting"
    exposed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
    assert exposed == name == "steerserve_num_requests_waiting"
    metrics_source = (ROOT / "server" / "steerserve" / "metrics.py").read_text()
    assert 'gauge("num_requests_waiting"' in metrics_source  # the server exports what we scale on
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]


def _env() -> dict[str, str]:
    """The container's environment as Kubernetes builds it: configMap values, then env in order,
    `$(VAR)` expanded from what precedes; secret values read from the Secret."""
    config = one("ConfigMap", "steerserve-config")["data"]
    secret = one("Secret", "steerserve-secrets")["stringData"]
    env: dict[str, str] = {}
    for source in CONTAINER["envFrom"]:
        assert source["configMapRef"]["name"] == "steerserve-config"
        env.update(config)
    for item in CONTAINER["env"]:
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "steerserve-secrets" and ref["key"] in secret, ref
            env[item["name"]] = secret[ref["key"]]
        else:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
    return env


def test_server_flags_parse_and_point_at_the_shared_registry():
    env = _env()
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in CONTAINER["args"]]
    config = parse_serve_flags(args)
    pg_service = one("Service", "steerserve-postgres")
    statefulset = one("StatefulSet", "steerserve-postgres")
    assert config.registry.registry_url == (
        f"postgresql://steerserve:change-me-postgres@{pg_service['metadata']['name']}:5432/steerserve"
    )
    assert statefulset["spec"]["serviceName"] == pg_service["metadata"]["name"]
    pg_env = {e["name"]: e for e in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert pg_env["POSTGRES_USER"]["value"] == "steerserve" and pg_env["POSTGRES_DB"]["value"] == "steerserve"
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "postgres-password"
    assert env["STEERSERVE_DATA_DIR"] == "/data" and config.model.model == "random:gpt2"
    assert {"STEERSERVE_API_KEY", "STEERSERVE_ADMIN_KEY"} <= set(env)


def test_replicas_share_one_readwritemany_blob_volume():
    pvc = one("PersistentVolumeClaim", "steerserve-blobs")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in POD["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in CONTAINER["volumeMounts"]}
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "steerserve-blobs"


def test_pod_runs_as_the_image_user_without_privileges():
    from tests.deploy.helpers import dockerfile

    image_user = next(i.value for i in reversed(dockerfile()) if i.keyword == "USER").split(":")[0]
    security = POD["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and str(security["runAsUser"]) == image_user
    assert CONTAINER["securityContext"]["allowPrivilegeEscalation"] is False
    assert CONTAINER["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in CONTAINER["volumeMounts"]}
    assert {"/data", "/tmp", "/cache"} <= writable  # everything the server writes has a volume
    env = _env()
    for cache in ("XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR"):
        assert env[cache].startswith("/cache"), cache
