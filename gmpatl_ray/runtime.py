"""Connecting to Ray: the cluster a job was submitted to, or a local one for a laptop run."""

from __future__ import annotations

import os

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in the driver of a submitted job (``ray job submit``)."""

RELATIVE_IN_A_JOB = (
    "in a submitted Ray job: they would resolve inside the job's temporary copy of the working dir on the "
    "head, which the other nodes do not see and Ray deletes; give absolute paths on storage every node "
    "mounts (configs/cluster.yaml: /mnt/shared/gmpatl)"
)


def in_submitted_job() -> bool:
    return JOB_CONFIG_ENV in os.environ


def init_ray() -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(dashboard_host="127.0.0.1")  # Ray Train's state checks need the dashboard; loopback only
