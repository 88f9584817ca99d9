"""MLflow tracking that never kills training, never loses what it was asked to log, and never jams.

Every call becomes a record (start a run, params, metrics, tags, an artifact, end a run) sent at once
through ``MlflowClient``. When the tracking server is unreachable or errors, the run warns once per outage,
appends the record to a local queue file named in the warning (``<output_dir>/tracking-offline/*.jsonl``)
and carries on; every later call first tries to send what waits (at most once per ``retry_after_s``), so
what was logged while the server was away reaches it when it is back, and the file is removed once empty.
A file left by a process that ended before the server came back is sent by ``gmpatl tracking-sync``.

A record the server refuses for good (a 4xx answer: a run deleted in the UI, an invalid key; a file that is
gone; an artifact outside the run's own reports and model folders) or keeps failing while it
answers other calls (``max_attempts``) goes to a dead-letter file named in a warning, and the records
after it flow on. The queue file is only appended to: records, then a line per record sent or refused.

Runs started while the server is away get a local handle (``offline-...``) that the replay maps to the
real run id, so the run tree comes out as if the server had never left. Runs are addressed by id, so
nested runs (a CV parent, a child per fold) need no global "active run". Nothing secret is logged or
queued (:mod:`gmpatl_ray.redact`): the server is named without its credentials, and params, tags and run
names are scrubbed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from .errors import InputError
from .redact import REDACTED, environment_secrets, is_secret_name, scrub, url_secrets

RESUMED_TAG = "gmpatl.resumed"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""How MLflow names a model-development experiment. MLflow 3.17's own UI does not read it (checked in a
headless browser): it opens every experiment in its GenAI view unless the link says
``?workflowType=machine_learning`` (:meth:`Tracker.ui_link`) or the user picked "Model training" once."""
UI_WORKFLOW = "workflowType=machine_learning"
TRANSIENT_CODES = {
    "INTERNAL_ERROR",  # also what a failed connection raises; a server's 500 on one record is retried
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "DEADLINE_EXCEEDED",
}
"""MLflow error codes that say "not now" rather than "never": an outage, overload, credentials to renew."""


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


def without_secrets(values: dict[str, Any], secrets: list[str]) -> dict[str, str]:
    """``values`` as strings, minus keys that name a secret, each value scrubbed."""
    return {k: scrub(str(v), secrets) for k, v in values.items() if not is_secret_name(k)}


class ArtifactOutsideRun(InputError):
    """An artifact record names a file outside the output folder's ``reports/`` and ``models/``."""


def permanent(err: BaseException) -> bool:
    """Whether sending a record failed for good (retrying cannot help) rather than for now."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return err.error_code not in TRANSIENT_CODES and 400 <= status < 500
    if isinstance(err, OSError):
        return isinstance(err, FileNotFoundError | IsADirectoryError | NotADirectoryError)
    return isinstance(err, ValueError | KeyError | TypeError)  # a malformed record, or ours


def not_now(err: BaseException) -> bool:
    """Whether ``err`` says the server cannot take anything now (a connection that failed, a timeout, a
    locked store, a rate limit, credentials to renew), rather than that this record failed."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException) and err.error_code in TRANSIENT_CODES - {"INTERNAL_ERROR"}:
        return True
    seen = err
    while seen is not None:
        if isinstance(seen, requests.ConnectionError | requests.Timeout | ConnectionError | TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class OfflineQueue:
    """The records one tracker could not send yet, in ``path``: a header line, then records (each with a
    sequence number) and progress lines (``{"done": seq}``, with the run ids learnt), only ever appended.
    The writing process holds an exclusive lock on the file while it lives, so ``gmpatl tracking-sync``
    can tell a file whose writer is gone from one still in use. Refused records go to
    ``tracking-offline/dead-letter/<name>``."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path, self.header = path, header
        self.dead_letter = path.parent / "dead-letter" / path.name.removesuffix(".sending")
        self.fd: int | None = None

    def append(self, line: dict[str, Any]) -> None:
        if self.fd is None:
            self._create()
        os.write(self.fd, (json.dumps(line, default=str) + "\n").encode())
        os.fsync(self.fd)

    def bury(self, record: dict[str, Any], error: str) -> None:
        """Keep ``record`` in the dead-letter file, with why it was refused."""
        self.dead_letter.parent.mkdir(parents=True, exist_ok=True)
        with open(self.dead_letter, "a") as f:
            f.write(json.dumps({"error": error, "record": record}, default=str) + "\n")

    def remove(self) -> None:
        """Nothing waits any more: the file goes (and with it the lock)."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None

    def _create(self) -> None:
        """The file appears complete with its header and already locked: written and locked under a
        temporary name, then renamed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:6]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, (json.dumps({"tracker": self.header}) + "\n").encode())
        os.fsync(fd)
        os.replace(tmp, self.path)
        self.fd = fd

    @classmethod
    def claim(cls, path: Path) -> tuple[OfflineQueue, list[dict[str, Any]], dict[str, str]]:
        """Take over a file another process left: lock it (refused while its writer lives), rename it to
        ``*.sending`` so no second sync sends it too, and read what still waits and the ids learnt."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            raise InputError(f"{path}: no such tracking-offline file (already sent?)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(
                f"{path}: held by a live process (the run writing it, which sends it itself once MLflow is "
                "back, or a tracking-sync sending it)"
            ) from None
        claimed = path if path.name.endswith(".sending") else path.with_name(path.name + ".sending")
        try:
            os.replace(path, claimed)
        except FileNotFoundError:
            os.close(fd)
            raise InputError(f"{path}: claimed by another tracking-sync meanwhile") from None
        if claimed.stat().st_size and claimed.read_bytes()[-1:] != b"\n":  # a last line cut short
            os.write(fd, b"\n")
        header, records, ids = cls.read(claimed)
        queue = cls(claimed, header)
        queue.fd = fd
        return queue, records, ids

    @staticmethod
    def read(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, str]]:
        lines = path.read_text().splitlines()
        try:
            header = json.loads(lines[0])["tracker"]
        except (IndexError, json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{path}: not a tracking-offline file (no header line)") from None
        records: dict[int, dict[str, Any]] = {}
        ids: dict[str, str] = dict(header.get("ids", {}))
        for number, text in enumerate(lines[1:], start=2):
            try:
                line = json.loads(text)
            except json.JSONDecodeError:  # an append cut short by a crash (the file is only appended to)
                warnings.warn(f"{path}:{number}: ignoring a line cut short", stacklevel=3)
                continue
            if isinstance(line, dict) and "done" in line:
                records.pop(line["done"], None)
                ids |= line.get("ids", {})
            elif isinstance(line, dict) and isinstance(line.get("seq"), int):
                records[line["seq"]] = line
            else:
                raise InputError(f"{path}:{number}: neither a record nor a progress line")
        return header, [records[seq] for seq in sorted(records)], ids


class Tracker:
    def __init__(
        self,
        experiment: str,
        uri: str | None,
        output_dir: str | Path,
        retry_after_s: float = 30.0,
        max_attempts: int = 4,
        queue: OfflineQueue | None = None,
    ):
        output_dir = Path(output_dir).resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        self.experiment = experiment
        self.uri = tracking_uri(uri, output_dir)
        self.server = scrub(self.uri)
        """The server as it may be shown, logged or stored: without credentials."""
        self.output_dir = output_dir
        self.artifact_root = (output_dir / "mlartifacts").as_uri()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{stamp}-{os.getpid()}-{uuid.uuid4().hex[:6]}.jsonl"
        self.queue = queue or OfflineQueue(
            output_dir / "tracking-offline" / name, {"experiment": experiment, "server": self.server}
        )
        self.retry_after_s = retry_after_s
        self.max_attempts = max_attempts
        self.pending: list[dict[str, Any]] = []
        self.seq = 0
        self.ids: dict[str, str] = {}  # offline handle -> MLflow run id, filled when the start is sent
        self.parents: dict[str, str] = {}  # run (handle and id) -> its parent run, for its folders
        self.refused = 0  # records sent to the dead-letter file
        self.last_error = ""
        self.registered: dict[str, str] = {}  # register record's key -> "NAME/VERSION", once sent
        self.secrets = environment_secrets() + url_secrets(self.uri)
        self.client = None
        self.experiment_id: str | None = None
        self.retry_at = 0.0
        self.outage = False
        try:
            self._connect()
        except Exception as err:  # tracking must never stop training
            self._went_offline(err)

    @property
    def offline(self) -> Path:
        """The queue file (it exists while something waits)."""
        return self.queue.path

    def sync_command(self) -> str:
        """The command that sends this tracker's queue file once its process has ended."""
        default = tracking_uri(None, self.output_dir)
        target = "" if self.uri == default else f" --uri {shlex.quote(self.server)}"
        hidden = REDACTED in self.server and REDACTED not in self.uri
        note = f" ({REDACTED} marks the credentials left out)" if hidden else ""
        return f"gmpatl tracking-sync{target} {shlex.quote(str(self.offline))}{note}"

    @classmethod
    def from_offline_file(cls, path: str | Path, uri: str | None) -> Tracker:
        """A tracker holding what ``path`` (a file left by an earlier process) still has to send, claimed
        from it. The records go to ``uri`` (default: ``MLFLOW_TRACKING_URI``, else the embedded store of
        the output folder the file is in), never to a server the file names: a file naming another
        server is refused. Its artifacts must lie in that output folder's ``reports/`` or ``models/``."""
        path = Path(path)
        output_dir = path.resolve().parent.parent
        if not path.is_file():
            raise InputError(f"{path}: no such tracking-offline file (already sent?)")
        target = scrub(tracking_uri(uri, output_dir))
        server = OfflineQueue.read(path)[0].get("server")
        if server != target:
            raise InputError(
                f"{path}: its records are for MLflow at {server}, not {target}; name the server they are "
                "for with --uri (gmpatl never takes the server from the file)"
            )
        queue, records, ids = OfflineQueue.claim(path)
        tracker = cls(queue.header["experiment"], uri, output_dir, queue=queue)
        tracker.pending, tracker.ids = records, ids
        tracker.parents = dict(queue.header.get("parents", {}))
        tracker.seq = max((r["seq"] for r in records), default=0)
        return tracker

    # -- the public calls -------------------------------------------------------------------------------

    def start(self, name: str, parent: str | None = None, tags: dict[str, str] | None = None) -> str:
        """A new run (a child of ``parent`` if given); returns its id, or a handle while offline."""
        handle = f"offline-{uuid.uuid4().hex}"
        tags = without_secrets(tags or {}, self.secrets)
        record = {"call": "start", "run": handle, "name": scrub(name, self.secrets), "parent": parent}
        self._submit(record | {"tags": tags})
        return self.ids.get(handle, handle)

    def find(self, name: str, parent: str | None, tags: dict[str, str]) -> tuple[str, str] | None:
        """(id, status) of the latest run named ``name`` under ``parent`` (None: a top-level run) whose
        tags include ``tags``; None when there is none or the server cannot be asked."""
        if self.client is None or self.pending or (parent or "").startswith("offline-"):
            return None
        clauses = [f"attributes.run_name = {filter_value(scrub(name, self.secrets))}"]
        tags = without_secrets(tags, self.secrets)
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
        """Log a file, or a directory's files, under the run's artifacts (inside ``folder`` if given).
        The path must lie in ``output_dir``'s ``reports/`` or ``models/``."""
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
        """Send every waiting record, in order (refused ones to the dead-letter file); True when nothing
        waits any more."""
        sent = 0
        while self.pending:
            record = self.pending[0]
            if not self._deliver(record):
                return False
            self.pending.pop(0)
            if self.pending:
                learnt = {record["run"]: self.ids[record["run"]]} if record["run"] in self.ids else {}
                self.queue.append({"done": record["seq"], "ids": learnt})
            sent += 1
        self.queue.remove()
        if sent:
            warnings.warn(
                f"MLflow at {self.server} is reachable again: sent {sent} records that waited", stacklevel=2
            )
        self.outage = False
        return True

    # -- sending -------------------------------------------------------------------------------------

    def _submit(self, record: dict[str, Any]) -> None:
        if self.pending and time.monotonic() >= self.retry_at:
            self.flush()
        if not self.pending and self._deliver(record):
            return
        self.seq += 1
        record = record | {"seq": self.seq}
        self.pending.append(record)
        if self.queue.fd is None:  # a new file: it carries what the records in it refer to
            self.queue.header |= {"ids": dict(self.ids), "parents": dict(self.parents)}
        self.queue.append(record)

    def _deliver(self, record: dict[str, Any]) -> bool:
        """Send ``record``: True when done with it (sent, or refused for good and kept in the dead-letter
        file), False while the server is away. A record the server fails while it answers other calls is
        tried ``max_attempts`` times in all, a little apart, then refused."""
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(0.25 * 2 ** (attempt - 1))
            try:
                self._send(record)
                return True
            except Exception as err:  # tracking must never stop training
                self.last_error = scrub(str(err), self.secrets)
                if permanent(err):
                    self._refuse(record, self.last_error)
                    return True
                if not_now(err) or not self._answers():
                    self._went_offline(err)
                    return False
                error = err
        answered = scrub(str(error), self.secrets)
        self._refuse(record, f"failed {self.max_attempts} times while MLflow answered: {answered}")
        return True

    def _answers(self) -> bool:
        """Whether the server answers a simple call (so a failure is the record's, not an outage)."""
        try:
            if self.client is None:
                self._connect()
            else:
                self.client.get_experiment(self.experiment_id)
            return True
        except Exception:
            return False

    def _refuse(self, record: dict[str, Any], error: str) -> None:
        self.refused += 1
        self.queue.bury(record, error)
        warnings.warn(
            f"MLflow at {self.server} refused a record ({record['call']}: {error}); it is kept in "
            f"{self.queue.dead_letter} and the records after it go on",
            stacklevel=4,
        )

    def ui_link(self) -> str:
        """Where the experiment's runs open in the MLflow UI: on its HTTP server, or (an embedded store)
        after ``mlflow ui`` on it, whose default address this is."""
        experiment = f"#/experiments/{self.experiment_id}" if self.experiment_id else "#/experiments"
        page = f"{experiment}?{UI_WORKFLOW}"
        if self.server.startswith(("http://", "https://")):
            return f"{self.server.rstrip('/')}/{page}"
        return f"http://127.0.0.1:5000/{page} after: mlflow ui --backend-store-uri {self.server}"

    def _connect(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        found = client.get_experiment_by_name(self.experiment)
        self.experiment_id = (
            found.experiment_id
            if found
            else client.create_experiment(self.experiment, artifact_location=self.artifact_root)
        )
        if not found or EXPERIMENT_KIND[0] not in found.tags:
            client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
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
            if parent:
                self.parents[record["run"]] = self.parents[created.info.run_id] = parent
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
            path = self._artifact_path(record["path"], record.get("run"))
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
            raise ValueError(f"unknown tracking record {call!r}")

    def _artifact_path(self, name: str, run: str | None) -> Path:
        """``name`` if it and everything in it (links followed) lie in the run's own folders: the reports
        folder of the run or of a run above it, and the run's model folder (:meth:`run_folders`); a queue
        file cannot make the tracker upload anything else."""
        path = Path(name)
        roots = [folder.resolve() for folder in self.run_folders(run)]
        inside, seen = [path], set()
        if path.is_dir():
            for folder, _, files in os.walk(path, followlinks=True):
                if (real := Path(folder).resolve()) in seen:
                    break  # a link loop
                seen.add(real)
                inside += [Path(folder), *(Path(folder) / f for f in files)]
        for each in inside:
            if not any(each.resolve().is_relative_to(root) for root in roots):
                raise ArtifactOutsideRun(
                    f"{each}: not in the run's folders ({', '.join(map(str, roots))}); only a run's own "
                    "reports and model are uploaded"
                )
        if not path.exists():
            raise FileNotFoundError(f"{path}: the artifact file is gone")
        return path

    def run_folders(self, run: str | None) -> list[Path]:
        """Where ``run``'s files may come from: ``reports/<run>`` of the run and the runs above it (a fold
        logs figures from its CV's reports) and ``models/<run>``, by handle and by id."""
        chain: list[str] = []
        current = run
        while current and current not in chain:
            chain.append(current)
            current = self.parents.get(current) or self.parents.get(self.ids.get(current, ""))
        names = {n for r in chain for n in (r, self.ids.get(r, r))}
        own = {n for n in (run, self.ids.get(run or "", run)) if n}
        return [self.output_dir / "reports" / n for n in sorted(names)] + [
            self.output_dir / "models" / n for n in sorted(own)
        ]

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
            error = scrub(str(err), self.secrets)
            warnings.warn(
                f"MLflow at {self.server} failed ({error}); training goes on, and what is not logged waits "
                f"in {self.offline} until the server is back (or `{self.sync_command()}`)",
                stacklevel=4,
            )
            self.outage = True


def _now_ms() -> int:
    return int(time.time() * 1000)
