"""Connecting to Ray: the cluster a job was submitted to, or a local one for a laptop run."""

from __future__ import annotations

import contextlib
import os
import sys
import time

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in the driver of a submitted job (``ray job submit``)."""

RELATIVE_IN_A_JOB = (
    "in a submitted Ray job: they would resolve inside the job's temporary copy of the working dir on the "
    "head, which the other nodes do not see and Ray deletes; give absolute paths on storage every node "
    "mounts (configs/cluster.yaml: /mnt/shared/gmpatl)"
)


def in_submitted_job() -> bool:
    return JOB_CONFIG_ENV in os.environ


EXIT_GRACE_S = 5.0
"""How long a local cluster's processes get to exit after ``ray.shutdown()`` before they are killed (the
healthy ones took 1.0-1.4 s in a by-hand check on 2 cores)."""

_local_cluster: list = []
"""The processes this one started with the local Ray cluster it started (``psutil.Process``es: Ray's
own, the raylet that runs the workers); empty when it joined a cluster (named by ``RAY_ADDRESS``, or
one ``ray start`` runs on this machine) or has none."""


def init_ray() -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else start a local one."""
    global _local_cluster
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    import psutil

    here = psutil.Process()
    before = {child.pid for child in here.children()}
    try:
        ray.init(dashboard_host="127.0.0.1")  # Ray Train's state checks need the dashboard; loopback only
    finally:  # a failed start may have started processes too
        _local_cluster = [child for child in here.children() if child.pid not in before]


def shutdown_ray() -> list[int]:
    """Disconnect from Ray; a local cluster this process started stops with the processes it runs.

    ``ray.shutdown()`` stops the cluster's own processes and its workers end on their own about a second
    later, but a worker that hangs while it exits outlives it: Ray 2.60's core worker can deadlock in its
    exit handler (``~CoreWorkerProcessImpl``, after it has told the raylet it is gone), which once left a
    Ray Train controller of about 900 MB behind, idle forever, after one of the demo's 15 stage runs. So
    the processes ``init_ray`` saw Ray start, and every process under them then (the workers under the
    raylet, a hung one included), are listed before the shutdown, waited for, and those still running
    ``EXIT_GRACE_S`` after it are killed and named on stderr (the run log); other children of this
    process are left alone. Returns the killed ones' ids. A joined cluster (a submitted job's, a test
    session's) is not ours: only the connection ends. Never raises for a process it could not see or
    kill (it says so)."""
    global _local_cluster
    ray = sys.modules.get("ray")
    started, _local_cluster = _local_cluster, []
    if ray is None:
        return []
    if not started:
        ray.shutdown()
        return []
    import psutil

    cluster = [p for p in started if _running(p)]
    for process in list(cluster):
        with contextlib.suppress(psutil.Error):
            cluster += process.children(recursive=True)
    try:
        ray.shutdown()
    finally:
        killed = _kill_what_is_left(cluster)
    return killed


def _kill_what_is_left(cluster: list) -> list[int]:
    import psutil

    deadline = time.monotonic() + EXIT_GRACE_S
    while (alive := [p for p in cluster if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = []
    for process in alive:
        try:
            name = " ".join(process.cmdline())[:100] or process.name()
            process.kill()
        except psutil.NoSuchProcess:
            continue
        except psutil.Error as error:
            print(f"could not stop pid {process.pid} of the local Ray cluster: {error}", file=sys.stderr)
            continue
        killed.append(process.pid)
        print(
            f"killed {name} (pid {process.pid}): still running {EXIT_GRACE_S:.0f} s after the local Ray "
            "cluster stopped",
            file=sys.stderr,
        )
    return killed


def _running(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
