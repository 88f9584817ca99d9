"""Connecting to Ray: a local cluster a command started is stopped with every process it ran, a worker
hanging in its exit included (Ray 2.60's core worker can deadlock there and outlive ``ray.shutdown()``),
and nothing else the command started."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil

HANGS_ON_EXIT = """
import json, os, subprocess, sys, threading, time

import psutil
import ray

from gmpatl_ray.runtime import init_ray, shutdown_ray

bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # not Ray's
init_ray()


@ray.remote(num_cpus=0)
class HangsOnExit:
    def pid(self):
        return os.getpid()

    def leave(self):
        threading.Thread(target=time.sleep, args=(3600,)).start()  # not a daemon: the process cannot end
        ray.actor.exit_actor()


@ray.remote
def pid():
    return os.getpid()


actor = HangsOnExit.remote()
hanging = ray.get(actor.pid.remote())
try:
    ray.get(actor.leave.remote())
except ray.exceptions.ActorDiedError:
    pass
healthy = ray.get(pid.remote())
time.sleep(1)
assert psutil.pid_exists(hanging), "the actor's process should still be there, exiting"
cluster = [p.pid for p in psutil.Process().children(recursive=True) if p.pid != bystander.pid]
killed = shutdown_ray()
spared = bystander.poll() is None
bystander.kill()
seen = {"hanging": hanging, "healthy": healthy, "cluster": cluster, "killed": killed, "spared": spared}
print(json.dumps(seen))
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_local_cluster_stops_with_every_process_it_ran_a_worker_hanging_on_exit_included():
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own
    result = subprocess.run(
        [sys.executable, "-c", HANGS_ON_EXIT], capture_output=True, text=True, env=environment, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["hanging"] in seen["cluster"] and seen["healthy"] in seen["cluster"]
    assert seen["hanging"] in seen["killed"]  # the one that outlived the shutdown, killed
    assert seen["healthy"] not in seen["killed"]  # a healthy worker ends with its cluster
    assert f"(pid {seen['hanging']}): still running 5 s after the local Ray cluster stopped" in result.stderr
    assert [pid for pid in seen["cluster"] if alive(pid)] == []  # nothing of the cluster is left
    assert seen["spared"]  # a child of the driver that is not Ray's goes on
