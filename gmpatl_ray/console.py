"""What a person sees while gmpatl works, and where everything else goes.

A command that runs on Ray (``cv``, ``train``, ``sweep``, ``extract``, ``cluster``, ``gmp-report``,
``predict``) opens a *run log*, ``<output_dir>/logs/<command>-<time>-<pid>.log``, named on the console's
first line, and points the process's stdout and stderr at it, file descriptors included: the lines Ray
forwards from its workers, Ray Data's and Ray Train's messages, the native core worker's, other libraries'
warnings all land there. The console keeps what gmpatl says (:func:`say`), gmpatl's own warnings, one
progress view (:class:`Progress`: a line per epoch and step, and on a terminal a live status line with the
elapsed and remaining time) and the results. When the command fails, the end of the run log is shown
before the traceback. Console and log are both scrubbed of secrets (:mod:`gmpatl_ray.redact`).
"""

from __future__ import annotations

import contextvars
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .redact import ScrubbedStream, environment_secrets
from .runtime import shutdown_ray

SHOWN_ON_FAILURE = 2000
"""Lines of the run log shown when a command fails (the whole file stays where the first line said)."""
PACKAGE = str(Path(__file__).parent)


@dataclass
class _Console:
    """The terminal while a run log is open: a stream for each of stdout and stderr, and a rich console
    over stdout for the live status line."""

    out: Any
    err: Any
    log: Path
    live: Any = None

    def show(self, text: str, err: bool) -> None:
        if self.live is not None and not err:
            self.live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            stream = self.err if err else self.out
            stream.write(text + "\n")
            stream.flush()


_CONSOLE: _Console | None = None
_VIEW: Progress | None = None
_TASK: contextvars.ContextVar[str | None] = contextvars.ContextVar("gmpatl_task", default=None)


def say(text: str = "", err: bool = False) -> None:
    """A line for the person running gmpatl: on the console (above the live status line) and, while a run
    log is open, in the log too."""
    print(text, file=sys.stderr if err else sys.stdout, flush=True)
    if _CONSOLE is not None:  # sys.stdout and sys.stderr went to the log: the console gets it here
        _CONSOLE.show(text, err)


@contextmanager
def run_log(output_dir: str | Path, command: str) -> Iterator[Path]:
    """While open, everything this process writes to stdout and stderr goes to the run log, and only
    :func:`say` and gmpatl's warnings reach the console. On an unexpected error the log's last lines are
    shown on the console before the error goes on."""
    global _CONSOLE
    folder = Path(output_dir) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    terminal = os.dup(1), os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    secrets = environment_secrets()
    out, err = (  # kept open as long as the log is, over the terminal's duplicated descriptors
        ScrubbedStream(open(fd, "w", buffering=1, closefd=False, encoding="utf-8"), secrets)  # noqa: SIM115
        for fd in terminal
    )
    out.write(f"log: {path} (Ray's and the workers' output)\n")
    for target in (1, 2):
        os.dup2(log, target)
    saved_show = warnings.showwarning
    warnings.showwarning = _show_warning
    _CONSOLE = _Console(out, err, path)
    try:
        yield path
    except (InputError, FileExistsError, KeyboardInterrupt):
        raise  # the message says it all (or the user stopped it)
    except BaseException:
        _flush_all()
        _show_tail(path, err)
        raise
    finally:
        _CONSOLE = None
        warnings.showwarning = saved_show
        try:
            shutdown_ray()  # the command is done: no worker line forwarded late reaches the console
        except Exception as error:  # the command's own outcome stands; this goes to the run log
            print(f"stopping Ray failed: {error!r}", file=sys.stderr)
        finally:
            _flush_all()
            for target, fd in zip((1, 2), terminal, strict=True):
                os.dup2(fd, target)
                os.close(fd)
            os.close(log)


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()


def _show_tail(path: Path, err) -> None:
    lines = path.read_text(errors="replace").splitlines()
    shown = lines[-SHOWN_ON_FAILURE:]
    cut = f", its last {len(shown)} of {len(lines)} lines" if len(shown) < len(lines) else ""
    err.write(f"---- the run log {path}{cut} ----\n")
    err.write("".join(f"{line}\n" for line in shown))
    err.write(f"---- end of the run log {path} ----\n")
    err.flush()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """gmpatl's own warnings (a tracking outage, a skipped line) on the console and in the log; any other
    library's in the log only."""
    text = warnings.formatwarning(message, category, filename, lineno, line)
    sys.stderr.write(text)
    if _CONSOLE is not None and str(filename).startswith(PACKAGE):
        _CONSOLE.show(f"warning: {message}", err=True)


@contextmanager
def task(label: str) -> Iterator[None]:
    """What this thread works on (``fold 3``, ``final``), for the progress view."""
    token = _TASK.set(label)
    try:
        yield
    finally:
        _TASK.reset(token)


def clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class _Task:
    step: str = ""
    started: float = 0.0
    partial: float = 0.0
    """Units of the running step done (epochs, as a fraction while one runs)."""
    detail: str = ""
    shown_epochs: int = 0


@dataclass
class Step:
    """A running step of a task: the caller says whether it was reused and, if it wants, what it did."""

    reused: bool = False
    detail: str = ""


@dataclass
class Progress:
    """How far a CV (or a final model) is: each task (fold) goes through ``weights``' steps, weighted by
    their epochs (the features and the GMPs count one each). Prints a line per finished epoch and step
    (so a log or a submitted job's output reads as a history, a few dozen lines a fold) and, on a
    terminal, keeps a live line of what runs now with the elapsed and remaining time."""

    title: str
    labels: list[str]
    weights: dict[str, float]
    started: float = field(default_factory=lambda: time.monotonic())
    finished: float = 0.0
    tasks: dict[str, _Task] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.tasks = {label: _Task() for label in self.labels}

    @property
    def total(self) -> float:
        return len(self.labels) * sum(self.weights.values())

    def done(self) -> float:
        return self.finished + sum(t.partial for t in self.tasks.values())

    def times(self) -> str:
        elapsed, done = time.monotonic() - self.started, self.done()
        left = f"~{clock(elapsed * (self.total - done) / done)} left" if done > 0 else "remaining: ?"
        return f"{clock(elapsed)} elapsed, {left}"

    def name(self, label: str) -> str:
        return f"[{self.labels.index(label) + 1}/{len(self.labels)}] {label}"

    @contextmanager
    def step(self, label: str, step: str) -> Iterator[Step]:
        running = Step()
        with self.lock:
            self.tasks[label] = _Task(step, time.monotonic())
        yield running
        with self.lock:
            self.tasks[label].step, self.tasks[label].partial = "", 0.0
            self.finished += self.weights[step]
            what = "reused from the cache" if running.reused else running.detail
            line = f"{self.name(label)} · {step} · {what} · {self.times()}" if what else None
        if line:
            say(line)

    def epoch(self, label: str, step: str, state: dict[str, Any]) -> None:
        """A stage's progress as its rank 0 wrote it (:func:`gmpatl_ray.training.write_progress`): the
        finished epochs' metrics, and the batch the running epoch is at."""
        epochs, history = state["epochs"], state["history"]
        lines = []
        with self.lock:
            running = self.tasks[label]
            batches = max(1, state.get("batches", 1))
            epochs_done = min(epochs, len(history) + state["batch"] / batches)
            running.partial = self.weights[step] * epochs_done / epochs
            running.detail = f"epoch {len(history) + 1}/{epochs} batch {state['batch']}/{batches}"
            for metrics in history[running.shown_epochs :]:
                val = metrics.get("val_uar")
                shown = f"val UAR {val:.1%}" if val is not None else f"val loss {metrics['val_loss']:.3f}"
                lines.append(
                    f"{self.name(label)} · {step} · epoch {metrics['epoch'] + 1}/{epochs} · "
                    f"loss {metrics['train_loss']:.3f} · {shown} · {self.times()}"
                )
            running.shown_epochs = len(history)
        for line in lines:
            say(line)

    def status(self) -> str:
        """The live line: every running task's step, then the times."""
        with self.lock:
            now = time.monotonic()
            running = [
                f"{label} {t.step} {t.detail or clock(now - t.started)}".strip()
                for label, t in self.tasks.items()
                if t.step
            ]
        return f"{self.title}: {' | '.join(running) or 'between steps'} · {self.times()}"


@contextmanager
def progress(title: str, labels: list[str], weights: dict[str, float]) -> Iterator[Progress]:
    """The progress view of this process's CV or final model, live on a terminal while a run log is
    open."""
    global _VIEW
    view = Progress(title, labels, weights)
    _VIEW = view
    live = None
    if _CONSOLE is not None and _CONSOLE.out.isatty():
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        live = Live(
            get_renderable=lambda: Text(view.status(), no_wrap=True, overflow="ellipsis"),
            console=Console(file=_CONSOLE.out),
            refresh_per_second=1,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        live.start()
        _CONSOLE.live = live
    try:
        yield view
    finally:
        _VIEW = None
        if live is not None:
            live.stop()
            if _CONSOLE is not None:
                _CONSOLE.live = None


def step(name: str):
    """The current task's step ``name`` in the progress view (a :class:`Step` to mark reuse on), or a
    plain :class:`Step` when there is no view (a trial, a test)."""
    label = _TASK.get()
    if _VIEW is None or label not in _VIEW.tasks:
        return nullcontext(Step())
    return _VIEW.step(label, name)


@contextmanager
def watching(path: Path, name: str, interval_s: float = 0.5) -> Iterator[None]:
    """While open, the stage's progress file ``path`` (written by its rank 0 on shared storage) is read
    every ``interval_s`` into the progress view, and once more at the end."""
    label, view = _TASK.get(), _VIEW
    if view is None or label not in view.tasks:
        yield
        return
    stop = threading.Event()

    def read() -> None:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):  # not written yet (the file is replaced whole, never half-written)
            return
        view.epoch(label, name, state)

    def poll() -> None:
        while not stop.wait(interval_s):
            read()

    poller = threading.Thread(target=poll, name=f"progress-{label}", daemon=True)
    poller.start()
    try:
        yield
    finally:
        stop.set()
        poller.join()
        read()
