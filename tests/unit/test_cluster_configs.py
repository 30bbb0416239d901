"""Cluster launch files: `ray up` configs pass Ray's own validation; KubeRay manifests have the structure we rely on."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY_UP_CONFIGS = ["cluster/aws.yaml", "cluster/gcp.yaml"]


def ray_validate(config: dict) -> None:
    """What `ray up` runs on a config before touching the cloud: fill defaults, then check the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("path", RAY_UP_CONFIGS)
def test_ray_up_config_passes_ray_validation(path):
    config = yaml.safe_load((REPO / path).read_text())
    ray_validate(config)
    workers = {name: spec for name, spec in config["available_node_types"].items() if name != config["head_node_type"]}
    assert workers, "no autoscaling worker types"
    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"], name
    assert config["docker"]["image"].endswith("robustfm:latest")
    head_start = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "--dashboard-host=127.0.0.1" in head_start


@pytest.mark.parametrize("path", RAY_UP_CONFIGS)
def test_ray_validation_rejects_a_broken_config(path):
    """Negative control: the validation the previous test relies on does reject bad files."""
    config = yaml.safe_load((REPO / path).read_text())
    config["max_workerz"] = 3
    with pytest.raises(Exception, match="max_workerz"):
        ray_validate(config)


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def cluster_specs() -> list[tuple[str, dict]]:
    raycluster = yaml.safe_load((REPO / "cluster/kuberay/raycluster.yaml").read_text())
    rayjob = yaml.safe_load((REPO / "cluster/kuberay/rayjob.yaml").read_text())
    assert raycluster["apiVersion"] == rayjob["apiVersion"] == "ray.io/v1"
    assert (raycluster["kind"], rayjob["kind"]) == ("RayCluster", "RayJob")
    return [("raycluster", raycluster["spec"]), ("rayjob", rayjob["spec"]["rayClusterSpec"])]


@pytest.mark.parametrize(("name", "spec"), cluster_specs())
def test_kuberay_pods_read_the_token_from_a_secret_and_mount_shared_storage(name, spec):
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "robustfm-shared"
        for container in containers(group["template"]):
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "value" not in env["RAY_AUTH_TOKEN"], "the token must come from a Secret, not the manifest"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "robustfm-ray-auth"
            assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]
            assert container["image"].endswith("robustfm:latest")
    for worker in spec["workerGroupSpecs"]:
        assert 0 <= worker["minReplicas"] <= worker["maxReplicas"]
        limits = containers(worker["template"])[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def test_rayjob_runs_cgclip_with_its_storage_on_the_shared_volume():
    job = yaml.safe_load((REPO / "cluster/kuberay/rayjob.yaml").read_text())["spec"]
    words = job["entrypoint"].split()
    assert words[:2] == ["python", "jobs/cgclip.py"]
    assert "train.storage_path=/mnt/shared/checkpoints" in words
    submitter_env = {e["name"]: e for e in containers(job["submitterPodTemplate"])[0]["env"]}
    assert "secretKeyRef" in submitter_env["RAY_AUTH_TOKEN"]["valueFrom"]


def test_no_manifest_or_config_carries_a_secret_value():
    for path in [*REPO.glob("cluster/**/*.yaml"), *REPO.glob("infra/*.yml"), *REPO.glob("configs/**/*.yaml")]:
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), f"{path} defines a Secret"
    compose = yaml.safe_load((REPO / "infra/docker-compose.yml").read_text())
    assert compose["services"]["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    assert compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${")
