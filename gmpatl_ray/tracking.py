"""MLflow tracking that never kills training.

Every call goes through :meth:`Tracker._safe`: if the tracking server is unreachable or errors, the run
warns once, appends what it could not log to ``<output_dir>/tracking-offline.jsonl`` (so nothing is lost)
and carries on. Runs are addressed by id through ``MlflowClient``, so nested runs (a CV parent, a child per
fold) need no global "active run".
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

SECRET_MARKERS = ("token", "password", "secret", "key")


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


class Tracker:
    def __init__(self, experiment: str, uri: str | None, output_dir: str | Path):
        self.offline = Path(output_dir) / "tracking-offline.jsonl"
        self.warned = False
        self.client = None
        self.experiment_id = None
        output_dir = Path(output_dir).resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri(uri, output_dir)

        def connect() -> None:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (
                found.experiment_id
                if found
                else self.client.create_experiment(
                    experiment, artifact_location=(output_dir / "mlartifacts").as_uri()
                )
            )

        self._safe("connect", {"experiment": experiment, "uri": self.uri}, connect)

    def _safe(self, what: str, payload: dict[str, Any], call) -> Any:
        try:
            return call()
        except Exception as err:  # tracking must never stop training
            if not self.warned:
                warnings.warn(
                    f"MLflow at {self.uri} failed ({err}); continuing, unlogged data goes to {self.offline}",
                    stacklevel=3,
                )
                self.warned = True
            with open(self.offline, "a") as f:
                f.write(json.dumps({"call": what, **payload}, default=str) + "\n")
            return None

    def start(self, name: str, parent: str | None = None, tags: dict[str, str] | None = None) -> str | None:
        tags = {**(tags or {}), **({"mlflow.parentRunId": parent} if parent else {})}

        def create() -> str:
            return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

        return self._safe("start", {"name": name, "parent": parent}, create) if self.client else None

    def params(self, run: str | None, params: dict[str, Any]) -> None:
        safe = {k: v for k, v in params.items() if not any(m in k.lower() for m in SECRET_MARKERS)}

        def log() -> None:
            from mlflow.entities import Param

            self.client.log_batch(run, params=[Param(k, str(v)[:6000]) for k, v in safe.items()])

        self._safe("params", {"run": run, "params": safe}, log)

    def metrics(self, run: str | None, metrics: dict[str, float], step: int = 0) -> None:
        def log() -> None:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(run, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

        self._safe("metrics", {"run": run, "metrics": metrics, "step": step}, log)

    def history(self, run: str | None, epochs: list[dict[str, Any]]) -> None:
        """Per-epoch metrics (``{"epoch": 0, "train_loss": ...}`` rows), stepped by epoch, so MLflow plots
        them as training curves."""
        for row in epochs:
            numbers = {k: v for k, v in row.items() if k != "epoch" and isinstance(v, int | float)}
            self.metrics(run, numbers, step=int(row["epoch"]))

    def artifact(self, run: str | None, path: Path, folder: str | None = None) -> None:
        """Log a file, or a directory's files, under the run's artifacts (inside ``folder`` if given)."""
        path = Path(path)

        def log() -> None:
            upload = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
            upload(run, str(path), folder)

        self._safe("artifact", {"run": run, "path": str(path), "folder": folder}, log)

    def end(self, run: str | None, status: str = "FINISHED") -> None:
        self._safe("end", {"run": run}, lambda: self.client.set_terminated(run, status))
