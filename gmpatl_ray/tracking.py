"""MLflow tracking that never kills training and never loses what it was asked to log.

Every call becomes a record (start a run, params, metrics, tags, an artifact, end a run) sent at once
through ``MlflowClient``. When the tracking server is unreachable or errors, the run warns once per outage,
keeps the record in order in a local file named in the warning (``<output_dir>/tracking-offline/*.jsonl``)
and carries on; every later call first tries to send what waits (at most once per ``retry_after_s``), so
what was logged while the server was away reaches it when it is back, and the file is removed once empty.
A file left by a process that ended before the server came back is sent by ``gmpatl tracking-sync``.

Runs started while the server is away get a local handle (``offline-...``) that the replay maps to the
real run id, so the run tree comes out as if the server had never left. Runs are addressed by id, so
nested runs (a CV parent, a child per fold) need no global "active run". Values of secret-looking
environment variables (tokens, passwords) are never logged, whatever param or tag carries them.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import InputError

SECRET_MARKERS = ("token", "password", "passwd", "secret", "key", "credential")
RESUMED_TAG = "gmpatl.resumed"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"stage1": {"alpha_e": 0.9}}`` -> ``{"stage1.alpha_e": 0.9}`` (MLflow params are flat)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def tracking_uri(uri: str | None, output_dir: str | Path) -> str:
    """The configured URI, else ``MLFLOW_TRACKING_URI``, else the embedded ``<output_dir>/mlflow.db``."""
    return (
        uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"
    )


def filter_value(value: object) -> str:
    """``value`` as a string literal of an MLflow search filter. MLflow's filters have no escape
    character: a value with a single quote goes in double quotes and the other way round; one with both
    cannot be searched for and is refused."""
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise InputError(f"{text!r}: a name with both kinds of quote cannot be searched for in MLflow")


def is_secret_name(name: str) -> bool:
    return any(marker in name.lower() for marker in SECRET_MARKERS)


def environment_secrets() -> list[str]:
    """Values of environment variables whose names say they are secret (long enough to be one)."""
    return [v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= 6]


def without_secrets(values: dict[str, Any], secrets: list[str]) -> dict[str, str]:
    """``values`` as strings, minus keys that name a secret and values that contain one."""
    return {
        k: str(v)
        for k, v in values.items()
        if not is_secret_name(k) and not any(s in str(v) for s in secrets)
    }


class Tracker:
    def __init__(
        self,
        experiment: str,
        uri: str | None,
        output_dir: str | Path,
        retry_after_s: float = 30.0,
        offline: Path | None = None,
    ):
        output_dir = Path(output_dir).resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        self.experiment = experiment
        self.uri = tracking_uri(uri, output_dir)
        self.artifact_root = (output_dir / "mlartifacts").as_uri()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{stamp}-{os.getpid()}-{uuid.uuid4().hex[:6]}.jsonl"
        self.offline = offline or output_dir / "tracking-offline" / name
        self.retry_after_s = retry_after_s
        self.pending: list[dict[str, Any]] = []
        self.ids: dict[str, str] = {}  # offline handle -> MLflow run id, filled when the start is sent
        self.registered: dict[str, str] = {}  # register record's key -> "NAME/VERSION", once sent
        self.secrets = environment_secrets()
        self.client = None
        self.experiment_id: str | None = None
        self.retry_at = 0.0
        self.outage = False
        try:
            self._connect()
        except Exception as err:  # tracking must never stop training
            self._went_offline(err)

    @classmethod
    def from_offline_file(cls, path: str | Path) -> Tracker:
        """A tracker holding what ``path`` (a file left by an earlier process) still has to send."""
        path = Path(path)
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        header, records = lines[0]["tracker"], lines[1:]
        tracker = cls(header["experiment"], header["uri"], path.parent.parent, offline=path)
        tracker.pending, tracker.ids = records, header["ids"]
        return tracker

    # -- the public calls -------------------------------------------------------------------------------

    def start(self, name: str, parent: str | None = None, tags: dict[str, str] | None = None) -> str:
        """A new run (a child of ``parent`` if given); returns its id, or a handle while offline."""
        handle = f"offline-{uuid.uuid4().hex}"
        record = {"call": "start", "run": handle, "name": name, "parent": parent, "tags": tags or {}}
        self._submit(record)
        return self.ids.get(handle, handle)

    def find(self, name: str, parent: str | None, tags: dict[str, str]) -> tuple[str, str] | None:
        """(id, status) of the latest run named ``name`` under ``parent`` (None: a top-level run) whose
        tags include ``tags``; None when there is none or the server cannot be asked."""
        if self.client is None or self.pending or (parent or "").startswith("offline-"):
            return None
        clauses = [f"attributes.run_name = {filter_value(name)}"]
        clauses += [f"tags.`{k}` = {filter_value(v)}" for k, v in tags.items()]
        if parent:
            clauses.append(f"tags.`mlflow.parentRunId` = {filter_value(parent)}")
        try:
            runs = self.client.search_runs(
                [self.experiment_id], " and ".join(clauses), order_by=["attributes.start_time DESC"]
            )
        except Exception as err:
            self._went_offline(err)
            return None
        run = next((r for r in runs if parent or "mlflow.parentRunId" not in r.data.tags), None)
        return (run.info.run_id, run.info.status) if run else None

    def resume(self, run: str) -> None:
        """Mark an interrupted run as running again, and as resumed."""
        self.tags(run, {RESUMED_TAG: "true"})
        self._submit({"call": "end", "run": run, "status": "RUNNING"})

    def params(self, run: str | None, params: dict[str, Any]) -> None:
        self._submit({"call": "params", "run": run, "params": without_secrets(params, self.secrets)})

    def tags(self, run: str | None, tags: dict[str, Any]) -> None:
        self._submit({"call": "tags", "run": run, "tags": without_secrets(tags, self.secrets)})

    def metrics(self, run: str | None, metrics: dict[str, float], step: int = 0) -> None:
        record = {"call": "metrics", "run": run, "metrics": metrics, "step": step, "time": _now_ms()}
        self._submit(record)

    def history(self, run: str | None, epochs: list[dict[str, Any]]) -> None:
        """Per-epoch metrics (``{"epoch": 0, "train_loss": ...}`` rows), stepped by epoch, so MLflow plots
        them as training curves."""
        for row in epochs:
            numbers = {k: v for k, v in row.items() if k != "epoch" and isinstance(v, int | float)}
            self.metrics(run, numbers, step=int(row["epoch"]))

    def artifact(self, run: str | None, path: Path, folder: str | None = None) -> None:
        """Log a file, or a directory's files, under the run's artifacts (inside ``folder`` if given)."""
        self._submit({"call": "artifact", "run": run, "path": str(Path(path).resolve()), "folder": folder})

    def register(self, run: str, artifact_path: str, name: str) -> str | None:
        """Register the model the run logged at ``artifact_path`` as a new version of the registered model
        ``name`` (created if missing). Returns ``NAME/VERSION`` when sent now; after an outage the
        registration waits with the rest and is made when the records are sent."""
        key = uuid.uuid4().hex
        self._submit({"call": "register", "run": run, "path": artifact_path, "name": name, "key": key})
        return self.registered.get(key)

    def end(self, run: str | None, status: str = "FINISHED") -> None:
        self._submit({"call": "end", "run": run, "status": status})

    def flush(self) -> bool:
        """Send every waiting record, in order; True when nothing waits any more."""
        sent = 0
        while self.pending:
            try:
                self._send(self.pending[0])
            except Exception as err:
                self._went_offline(err)
                self._save_pending()
                return False
            self.pending.pop(0)
            sent += 1
        self._save_pending()
        if sent:
            warnings.warn(
                f"MLflow at {self.uri} is reachable again: sent {sent} records that waited", stacklevel=2
            )
        self.outage = False
        return True

    # -- sending -------------------------------------------------------------------------------------

    def _submit(self, record: dict[str, Any]) -> None:
        if self.pending and time.monotonic() >= self.retry_at:
            self.flush()
        if not self.pending:
            try:
                self._send(record)
                return
            except Exception as err:  # tracking must never stop training
                self._went_offline(err)
        self.pending.append(record)
        self._save_pending()

    def _connect(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        found = client.get_experiment_by_name(self.experiment)
        self.experiment_id = (
            found.experiment_id
            if found
            else client.create_experiment(self.experiment, artifact_location=self.artifact_root)
        )
        self.client = client

    def _send(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if self.client is None:
            self._connect()
        call, run = record["call"], self.ids.get(record.get("run"), record.get("run"))
        if call == "start":
            parent = record["parent"]
            tags = record["tags"] | ({"mlflow.parentRunId": self.ids.get(parent, parent)} if parent else {})
            created = self.client.create_run(self.experiment_id, run_name=record["name"], tags=tags)
            self.ids[record["run"]] = created.info.run_id
        elif call == "params":
            params = [Param(k, v[:6000]) for k, v in record["params"].items()]
            self.client.log_batch(run, params=params)
        elif call == "tags":
            self.client.log_batch(run, tags=[RunTag(k, v) for k, v in record["tags"].items()])
        elif call == "metrics":
            metrics = [
                Metric(k, float(v), record["time"], record["step"]) for k, v in record["metrics"].items()
            ]
            self.client.log_batch(run, metrics=metrics)
        elif call == "artifact":
            path = Path(record["path"])
            upload = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
            upload(run, str(path), record["folder"])
        elif call == "register":
            self.registered[record["key"]] = self._register(run, record["path"], record["name"])
        elif call == "end":
            if record["status"] == "RUNNING":
                self.client.update_run(run, status="RUNNING")
            else:
                self.client.set_terminated(run, record["status"])
        else:
            raise ValueError(f"{self.offline}: unknown tracking record {call!r}")

    def _register(self, run: str, artifact_path: str, name: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self.client.get_run(run).info.artifact_uri}/{artifact_path}"
        version = self.client.create_model_version(name, source, run_id=run)
        self.client.set_tag(run, "gmpatl.registered_model", f"{name}/{version.version}")
        return f"{name}/{version.version}"

    def _went_offline(self, err: Exception) -> None:
        self.retry_at = time.monotonic() + self.retry_after_s
        if not self.outage:
            warnings.warn(
                f"MLflow at {self.uri} failed ({err}); training goes on, and what is not logged waits in "
                f"{self.offline} until the server is back (or `gmpatl tracking-sync {self.offline}`)",
                stacklevel=4,
            )
            self.outage = True

    def _save_pending(self) -> None:
        """The waiting records, rewritten atomically (the file exists exactly while something waits)."""
        if not self.pending:
            self.offline.unlink(missing_ok=True)
            return
        header = {"tracker": {"experiment": self.experiment, "uri": self.uri, "ids": self.ids}}
        lines = [json.dumps(header)] + [json.dumps(r, default=str) for r in self.pending]
        atomic_write_text(self.offline, "\n".join(lines) + "\n")


def _now_ms() -> int:
    return int(time.time() * 1000)
