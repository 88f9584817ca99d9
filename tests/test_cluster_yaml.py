"""cluster.yaml, the node image and the GPU lock: a valid Ray cluster-launcher config under Ray's own
schema that mounts the shared storage on every node and into the container, boots nodes from the image the
Dockerfile builds (on an AMI whose driver runs CUDA 13), ships no environments or outputs, keeps ports
private; the Dockerfile installs constraints-gpu.txt, which resolves as it is and shares every version
with the CPU lock the suite runs on."""

import copy
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from gmpatl_ray.config import load_config

REPO = Path(__file__).parent.parent
CLUSTER_YAML = REPO / "cluster.yaml"
SHARED = "/mnt/shared"
sys.path.insert(0, str(REPO / "tools"))
import gpu_lock  # noqa: E402


@pytest.fixture
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_schema(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_the_schema_check_catches_a_bad_key(cluster):
    cluster["available_node_types"]["gpu_worker"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="'min_worker' was unexpected"):
        validate_config(prepare_config(cluster))


def test_dashboard_and_job_api_stay_on_loopback(cluster):
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in CLUSTER_YAML.read_text()


def test_every_node_mounts_the_shared_storage_and_the_container_sees_it(cluster):
    """Ray's docker runner binds only file_mounts paths into the container: the EFS mount needs its own
    ``-v``, and it must be where configs/cluster.yaml puts every path."""
    mount = " ".join(cluster["initialization_commands"])  # on the host, before the container starts
    assert re.search(rf"mount -t nfs4 .*:/ {SHARED}\b", mount)
    assert f"-v {SHARED}:{SHARED}" in cluster["docker"]["run_options"]
    assert load_config(REPO / "configs" / "cluster.yaml").experiment.output_dir.startswith(f"{SHARED}/")
    assert any(SHARED in command for command in cluster["setup_commands"])  # checked in the container
    # The MLflow server's store: on the head's own disk, so it outlives the container (README)
    assert "-v /home/ubuntu/mlflow:/home/ray/mlflow" in cluster["docker"]["run_options"]


def test_the_mount_refuses_to_run_until_the_file_system_is_set(cluster):
    """The placeholder stops node setup with a message, before any sudo or mount."""
    result = subprocess.run(
        ["bash", "-c", cluster["initialization_commands"][0]], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1 and "set EFS to your file system's DNS name" in result.stderr


def test_nodes_boot_the_baked_image_on_an_ami_with_a_cuda_13_driver(cluster):
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-gpu$", dockerfile, re.M)
    assert "pip install --no-cache-dir -r /tmp/gmpatl/constraints-gpu.txt" in dockerfile
    assert cluster["docker"]["image"].endswith("/gmpatl-ray:0.1.0-gpu")
    installs = [c for c in cluster["setup_commands"] if "pip install" in c]  # fetch nothing at boot
    assert installs and all("--no-deps" in c and "--no-build-isolation" in c for c in installs)
    amis = {node["node_config"]["ImageId"] for node in cluster["available_node_types"].values()}
    assert len(amis) == 1 and re.fullmatch(r"ami-[0-9a-f]{8,17}|ami-SET-ME", amis.pop())  # one AMI, set once
    ami_note = CLUSTER_YAML.read_text().split("ImageId: &ami")[0].rsplit("SET:", 1)[1]
    assert (
        "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
        in ami_note
    )
    assert "torch.cuda.is_available()" in " ".join(cluster["worker_setup_commands"])


def test_environments_outputs_and_history_are_not_synced_to_the_nodes(cluster):
    excluded = set(cluster["rsync_exclude"])
    assert {".venv", "outputs", "**/.git"} <= excluded
    dockerignore = (REPO / ".dockerignore").read_text().splitlines()
    assert dockerignore[1] == "*"  # the image context holds what the Dockerfile copies, no more


def test_the_gpu_lock_shares_every_version_with_the_cpu_lock_and_satisfies_the_project():
    gpu, cpu = gpu_lock.read_lock(gpu_lock.GPU_LOCK), gpu_lock.read_lock(gpu_lock.CPU_LOCK)
    differ = {name: (cpu[name], gpu[name]) for name in cpu.keys() & gpu.keys() if cpu[name] != gpu[name]}
    assert differ == {}
    assert gpu["torch"] == "2.14.1" and gpu["ray"] == "2.60.0" and gpu["cuml-cu13"].startswith("26.")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    project = [Requirement(r) for r in [*meta["dependencies"], *meta["optional-dependencies"]["gpu"]]]
    for requirement in project:
        name = gpu_lock.normalise(requirement.name)
        assert name in gpu and requirement.specifier.contains(gpu[name]), (str(requirement), gpu.get(name))


@pytest.mark.slow
def test_the_images_install_line_resolves_to_exactly_the_gpu_lock():
    """pip's resolver (a dry run: metadata only) on ``pip install -r constraints-gpu.txt``, the
    Dockerfile's line: every dependency of every package is met by the lock, nothing else comes in."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_lock.py")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pins resolve as they are" in result.stdout


def test_the_launcher_makes_no_security_group_or_instance_role_of_its_own(cluster, monkeypatch):
    """Ray's own AWS bootstrap steps, run on the config: with the group named for every node type it makes
    none (the group Ray makes allows SSH from 0.0.0.0/0), and with the head's instance profile named it
    attaches no default role (EC2 and S3 full access). Either would call AWS, which fails here."""
    from ray.autoscaler._private.aws.config import _configure_iam_role, _configure_security_group

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "none")  # any call that got through would be refused
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "none")
    config = prepare_config(copy.deepcopy(cluster))
    assert _configure_security_group(copy.deepcopy(config)) == config
    assert _configure_iam_role(copy.deepcopy(config)) == config
    nodes = cluster["available_node_types"]
    groups = {tuple(node["node_config"]["SecurityGroupIds"]) for node in nodes.values()}
    assert groups == {("sg-SET-ME",)} and "security_group" not in cluster["provider"]
    workers = [node for name, node in nodes.items() if name != cluster["head_node_type"]]
    assert all("IamInstanceProfile" not in node["node_config"] for node in workers)


def test_the_heads_policy_can_only_touch_the_clusters_own_instances(cluster):
    """EC2 calls only; instances launched must carry the cluster's tag, tags are set at launch or on the
    cluster's instances only (so no other instance can be tagged into the cluster), and stop, start and
    terminate need the tag."""
    policy = json.loads((REPO / "cluster-head-policy.json").read_text())
    statements = policy["Statement"]
    actions = [
        a for st in statements for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])
    ]
    assert all(a.startswith("ec2:") and "*" not in a for a in actions)  # no S3, no IAM, no wildcard
    cluster_tag = {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": cluster["cluster_name"]}}
    for statement in statements:
        named = {statement["Action"]} if isinstance(statement["Action"], str) else set(statement["Action"])
        if named & {"ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"}:
            assert statement["Condition"] == cluster_tag
        if "ec2:CreateTags" in named:
            assert statement["Condition"] in (
                cluster_tag,
                {"StringEquals": {"ec2:CreateAction": "RunInstances"}},
            )
        if "ec2:RunInstances" in named and statement.get("Resource") == "arn:aws:ec2:*:*:instance/*":
            tag = statement["Condition"]["StringEquals"]["aws:RequestTag/ray-cluster-name"]
            assert tag == cluster["cluster_name"]
        if "ec2:RunInstances" in named and "Resource" not in statement:
            assert statement["NotResource"] == "arn:aws:ec2:*:*:instance/*"
