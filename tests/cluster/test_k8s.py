"""The Helm chart (deploy/k8s/citytel) renders and lints, and says what the tested compose
deployment says: same image, same commands, metrics ports, probes, config and secrets paths.
Kubernetes itself cannot run here; the compose deployment is the one tested for real, and this
keeps the two in step."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from citytel.config import load_settings
from citytel.devtools import cluster, stack
from citytel.devtools.settings import load_dev_settings

pytestmark = [pytest.mark.cluster]

CHART = cluster.ROOT / "deploy" / "k8s" / "citytel"


def helm(*arguments: str) -> str:
    binary = stack.cache_dir() / "helm-v3.21.4" / "helm"
    done = subprocess.run([str(binary), *arguments], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def yaml_documents(text: str) -> list[Any]:
    """YAML to objects, with the PyYAML that podman-compose brings (citytel has no YAML
    dependency of its own)."""
    python = stack.cache_dir() / f"podman-compose-{cluster.COMPOSE_VERSION}" / "bin" / "python"
    program = "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))"
    done = subprocess.run([str(python), "-c", program], input=text, capture_output=True, text=True, check=True)
    documents: list[Any] = json.loads(done.stdout)
    return documents


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> cluster.Cluster:
    """A compose deployment's directory (its citytel.toml, certificates, secrets), made but not
    started: what the chart is rendered with and compared against."""
    prepared = cluster.Cluster(tmp_path_factory.mktemp("k8s"), project="citytel-k8s")
    cluster.prepare(prepared, load_settings(), load_dev_settings())
    return prepared


@pytest.fixture(scope="module")
def rendered(deployment: cluster.Cluster) -> dict[tuple[str, str], Any]:
    config = deployment.directory / "citytel.toml"
    helm("lint", "--strict", str(CHART), "--set-file", f"config={config}")
    objects = yaml_documents(helm("template", "city", str(CHART), "--set-file", f"config={config}"))
    return {(item["kind"], item["metadata"]["name"]): item for item in objects}


def compose_services(deployment: cluster.Cluster) -> dict[str, Any]:
    """compose.yaml as podman-compose resolves it for this deployment (anchors merged,
    variables filled in)."""
    services: dict[str, Any] = yaml_documents(deployment.compose("config").stdout)[0]["services"]
    return services


def pod(rendered: dict[tuple[str, str], Any], kind: str, name: str) -> dict[str, Any]:
    container: dict[str, Any] = rendered[(kind, name)]["spec"]["template"]["spec"]["containers"][0]
    return container


@pytest.mark.parametrize(
    ("kind", "name", "service"),
    [("StatefulSet", "city-bridge", "bridge-1"), ("Deployment", "city-processor", "processor-1"),
     ("Deployment", "city-alerter", "alerter")],
)  # fmt: skip
def test_the_chart_runs_what_the_compose_deployment_runs(
    rendered: dict[tuple[str, str], Any], kind: str, name: str, service: str, deployment: cluster.Cluster
) -> None:
    compose = compose_services(deployment)[service]
    container = pod(rendered, kind, name)
    image = compose.get("image") or "localhost/citytel:latest"
    assert container["image"] == image
    # The same role, with the same options (a bridge's client id is its pod's name here).
    command = compose["command"]
    same = command[:-1] if command[0] == "bridge" else command
    assert container["args"][: len(same)] == same
    # The same probe on the same port: compose's health check URL is the readiness probe's.
    url = compose["healthcheck"]["test"][-1]
    port, path = url.removeprefix("http://127.0.0.1:").split("/", 1)
    assert container["ports"][0]["containerPort"] == int(port)
    assert container["readinessProbe"]["httpGet"]["path"] == "/" + path
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    settings = deployment.host_settings()
    role_port = {"bridge": settings.metrics.bridge_port, "process": settings.metrics.processor_port}
    assert int(port) == role_port.get(command[0], settings.metrics.alerter_port)
    # Config and secrets where the processes' citytel.toml expects them, read-only.
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    compose_mounts = {volume.split(":")[1] for volume in compose["volumes"]}
    assert "/run/secrets/citytel" in mounts
    assert "/run/secrets/citytel" in compose_mounts
    assert "/etc/citytel/citytel.toml" in compose_mounts
    assert "/etc/citytel" in mounts
    assert all(mounts[path]["readOnly"] for path in ("/etc/citytel", "/run/secrets/citytel"))
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert compose.get("read_only") is True


def test_the_chart_carries_the_deployments_config_and_bounds_disruption(
    rendered: dict[tuple[str, str], Any], deployment: cluster.Cluster
) -> None:
    config: Path = deployment.directory / "citytel.toml"
    assert rendered[("ConfigMap", "city-config")]["data"]["citytel.toml"] == config.read_text()
    for name in ("city-bridge", "city-processor"):
        assert rendered[("PodDisruptionBudget", name)]["spec"]["maxUnavailable"] == 1
    assert ("ServiceMonitor", "city") in rendered
    bridge = rendered[("StatefulSet", "city-bridge")]["spec"]
    assert bridge["replicas"] == 2
    assert pod(rendered, "StatefulSet", "city-bridge")["args"][-1] == "$(POD_NAME)"


def test_the_chart_refuses_to_render_without_a_config() -> None:
    binary = stack.cache_dir() / "helm-v3.21.4" / "helm"
    done = subprocess.run([str(binary), "template", "city", str(CHART)], capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "set-file config=citytel.toml" in done.stderr
