"""The Helm chart under deploy/helm/customllm, validated offline: rendered by the real Helm SDK (helm-python-sdk
bundles Helm v4's Go library) for a matrix of values, every object checked against the Kubernetes JSON schemas
(kubernetes-validate, strict) or, for the CRDs, against the schemas in crd_schemas/, golden assertions per case,
the router's flags parsed by vllm-router's own parser, and the scaling rules run by `promtool test rules`.

Nothing here contacts a cluster: no kind, no API server; see docs/deployment.md for what that leaves unproven.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is in the dev extras")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extras")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "customllm"
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.yaml",
}
# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest the schemas know.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
NAMESPACE, RELEASE = "serving", "llm"

CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gpu": {"gpu": {"enabled": True, "count": 2, "nodeSelector": {"gpu": "h100"}},
            "server": {"model": "/models/customllm", "dtype": "bfloat16"},
            "extraVolumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
            "extraVolumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}]},
    "hpa": {"autoscaling": {"keda": {"enabled": False}, "hpa": {"enabled": True}, "minReplicas": 2}},
    "static": {"autoscaling": {"keda": {"enabled": False}}, "replicaCount": 3, "router": {"enabled": False},
               "metrics": {"serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False}},
               "podDisruptionBudget": {"enabled": False}},
    "long-drain": {"server": {"shutdownTimeout": 600}, "preStopSleepSeconds": 20,
                   "terminationGracePeriodSeconds": 700},
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    chart = helm.Chart.load(str(CHART))
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = [d for text in manifests.values() for d in yaml.safe_load_all(text) if d]
    assert docs, "the chart rendered nothing"
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    return doc


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(docs, "Deployment", f"{RELEASE}-customllm")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def flag(container: dict[str, Any], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"--{name}=")]
    return values[-1] if values else None


@pytest.mark.parametrize("case", list(CASES))
def test_every_rendered_object_passes_its_schema(case: str) -> None:
    docs = render(CASES[case])
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_SCHEMAS:
            schema = yaml.safe_load((Path(__file__).parent / "crd_schemas" / CRD_SCHEMAS[key]).read_text())
            jsonschema.validate(doc, schema)
        else:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
    lint = helm.lint(str(CHART), CASES[case], strict=True, namespace=NAMESPACE)
    assert not lint["errors"] and not [m for m in lint["messages"] if m["severity"] >= 2], lint


def test_defaults_golden() -> None:
    docs = render({})
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Deployment", "Deployment", "Service", "Service", "PodDisruptionBudget",
                            "ServiceMonitor", "ServiceMonitor", "PrometheusRule", "ScaledObject", "ServiceAccount",
                            "Role", "RoleBinding"])
    deployment = one(docs, "Deployment", f"{RELEASE}-customllm")
    # KEDA owns the replica count: the Deployment must not fight it with a fixed one.
    assert "replicas" not in deployment["spec"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(docs)
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    shutdown = float(flag(container, "shutdown-timeout") or 0)
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + shutdown == 70
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a real checkpoint loads for minutes
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/version"  # a draining replica is not restarted
    assert flag(container, "device") == "cpu" and "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert flag(container, "host") == "0.0.0.0"
    scaled = one(docs, "ScaledObject")
    assert scaled["spec"]["minReplicaCount"] >= 1
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["query"] == \
        f'sum(vllm:num_requests_waiting{{namespace="{NAMESPACE}",service="{RELEASE}-customllm"}})'
    assert trigger["metadata"]["threshold"] == "4"
    scale_down = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]
    # The Service, the PDB and the ServiceMonitor select exactly the server pods.
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service", f"{RELEASE}-customllm")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    monitor = one(docs, "ServiceMonitor", f"{RELEASE}-customllm-server")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_the_router_runs_as_its_own_deployment_with_flags_vllm_router_accepts() -> None:
    docs = render({})
    router = one(docs, "Deployment", f"{RELEASE}-customllm-router")
    (container,) = router["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["vllm-router"]
    args = container["args"]
    router_args = pytest.importorskip("vllm_router.router_args", reason="vllm-router is in the dev extras")
    parser = argparse.ArgumentParser()
    router_args.RouterArgs.add_cli_args(parser)
    parsed = parser.parse_args(args)  # exits (SystemExit) on a flag the router does not know
    assert parsed.service_discovery and parsed.policy == "cache_aware"
    assert parsed.service_discovery_namespace == NAMESPACE and parsed.service_discovery_port == 8000
    server_labels = one(docs, "Deployment", f"{RELEASE}-customllm")["spec"]["selector"]["matchLabels"]
    assert dict(s.split("=", 1) for s in parsed.selector) == server_labels  # the Ready server pods, only them
    assert router["spec"]["template"]["spec"]["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert one(docs, "Role")["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]


def test_gpu_case_golden() -> None:
    docs = render(CASES["gpu"])
    container = server_container(docs)
    pod = one(docs, "Deployment", f"{RELEASE}-customllm")["spec"]["template"]["spec"]
    assert flag(container, "device") == "cuda" and flag(container, "model") == "/models/customllm"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["limits"]["memory"] == "16Gi"  # the defaults are kept beside the GPU
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["volumeMounts"] == [{"name": "models", "mountPath": "/models", "readOnly": True}]


def test_hpa_case_golden() -> None:
    docs = render(CASES["hpa"])
    assert not by_kind(docs, "ScaledObject")
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == 2
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "customllm_num_requests_waiting"
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    # The adapter rule that serves it names the same metric and the same query.
    adapter = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["external"]
    assert rule["name"]["as"] == "customllm_num_requests_waiting"
    assert rule["seriesQuery"].startswith("vllm:num_requests_waiting")


def test_static_case_golden() -> None:
    docs = render(CASES["static"])
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Service"]
    assert one(docs, "Deployment")["spec"]["replicas"] == 3


def test_long_drain_case_keeps_the_given_grace_period() -> None:
    docs = render(CASES["long-drain"])
    pod = one(docs, "Deployment", f"{RELEASE}-customllm")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 700
    assert flag(server_container(docs), "shutdown-timeout") == "600"


@pytest.mark.parametrize(("values", "message"), [
    ({"autoscaling": {"minReplicas": 0}}, "minReplicas must be >= 1"),
    ({"terminationGracePeriodSeconds": 30}, "terminationGracePeriodSeconds (30) must be at least"),
    ({"autoscaling": {"hpa": {"enabled": True}}}, "enable one of autoscaling.keda and autoscaling.hpa"),
])
def test_unsafe_values_are_refused_at_render_time(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        render(values)


def test_promtool_runs_the_scaling_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        assert not os.environ.get("CI"), "promtool (Debian's prometheus package) must be installed in CI"
        pytest.skip("promtool is not installed")
    rule = one(render({}), "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(Path(__file__).parent / "promtool" / "scaling_test.yaml", tmp_path / "scaling_test.yaml")
    check = subprocess.run([promtool, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    result = subprocess.run([promtool, "test", "rules", "scaling_test.yaml"], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
