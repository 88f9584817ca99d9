"""Connecting to Ray: the cluster a job was submitted to, or a local one for a laptop run."""

from __future__ import annotations

import os


def init_ray() -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(dashboard_host="127.0.0.1")  # Ray Train's state checks need the dashboard; loopback only
