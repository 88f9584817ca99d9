"""cluster.yaml is a valid Ray cluster-launcher config under Ray's own schema, and keeps ports private."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).parent.parent / "cluster.yaml"


@pytest.fixture
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_schema(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_the_schema_check_catches_a_bad_key(cluster):
    cluster["available_node_types"]["gpu_worker"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="'min_worker' was unexpected"):
        validate_config(prepare_config(cluster))


def test_image_matches_the_pinned_ray_and_python(cluster):
    assert cluster["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"


def test_dashboard_and_job_api_stay_on_loopback(cluster):
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in CLUSTER_YAML.read_text()
