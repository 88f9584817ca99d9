"""The ``gmpatl`` command (also ``python -m gmpatl_ray``); ``jobs/*.py`` wrap it for ``ray job submit``.

Every subcommand takes ``--config FILE`` and any number of ``--set section.field=value`` overrides, so a
run is always one validated config; the explicit forms (``prepare iemocap --root ...``) are shorthands for
overrides of that config.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

from .atomic import atomic_write_text
from .config import Config, dump_config, load_config, with_absolute_paths
from .console import run_log, say
from .errors import InputError
from .redact import REDACTED, scrub, scrubbed_console

EXIT_BAD_INPUT = 2
LOGGED = {"extract", "cluster", "gmp-report", "cv", "train", "predict", "sweep"}
"""The commands that run on Ray: Ray's and the workers' output goes to a run log (``gmpatl_ray.console``)."""


def _config_args(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps a value given before a sub-subcommand from being reset to the default after it.
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="experiment YAML (default: the paper's IEMOCAP settings)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="FIELD=VALUE",
        action="extend",
        nargs="+",
        default=argparse.SUPPRESS,
        help="override config fields, e.g. stage1.alpha_e=0.8",
    )


def _prepare_args(parser: argparse.ArgumentParser) -> None:
    _config_args(parser)
    parser.add_argument(
        "--on-error",
        choices=["fail", "skip"],
        default=argparse.SUPPRESS,
        help="fail (default): list every problem and write nothing; "
        "skip: write the manifest without them and list them beside it",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        default=argparse.SUPPRESS,
        help="fail unless the counts are the full IEMOCAP release's (5531 utterances)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmpatl",
        description="GMP-ATL speech emotion recognition (HuBERT + multi-scale pseudo-labels) on Ray.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="build the corpus manifest that every later step reads")
    _prepare_args(prepare)
    corpora = prepare.add_subparsers(
        dest="corpus",
        metavar="{iemocap,demo,manifest}",
        help="shorthand for data.source and its paths (default: from the config)",
    )
    iemocap = corpora.add_parser("iemocap", help="parse IEMOCAP_full_release")
    _prepare_args(iemocap)
    iemocap.add_argument("--root", required=True, help="the IEMOCAP_full_release folder")
    iemocap.add_argument("--out", required=True, help="manifest file to write (.csv or .parquet)")
    demo = corpora.add_parser("demo", help="generate the demo corpus in IEMOCAP's layout and parse it")
    _prepare_args(demo)
    demo.add_argument("--out", required=True, help="folder for IEMOCAP_demo/ and manifest.csv")
    own = corpora.add_parser("manifest", help="check and complete your own corpus CSV")
    _prepare_args(own)
    own.add_argument("--csv", required=True, help="your CSV (README: 'Bring your own corpus')")
    own.add_argument("--out", required=True, help="manifest file to write (.csv or .parquet)")

    extract = commands.add_parser("extract", help="HuBERT layer features of the manifest with Ray Data")
    _config_args(extract)
    cluster = commands.add_parser("cluster", help="extract, then multi-scale k-means pseudo-labels (GMPs)")
    _config_args(cluster)
    gmp_report = commands.add_parser(
        "gmp-report",
        help="purity and NMI of GMPs vs emotion and gender for each of extract.layers "
        "(and each backbone a sweep over backbone.pretrained lists)",
    )
    _config_args(gmp_report)

    cv = commands.add_parser("cv", help="GMP-ATL leave-one-fold-out: all stages per fold, WAR/UAR, MLflow")
    _config_args(cv)
    cv.add_argument("--folds", help="comma-separated folds to run (default: all), e.g. 1,3")

    train = commands.add_parser(
        "train",
        help="the final model: all stages on every fold's data, one MLflow run (tracking.register_model)",
    )
    _config_args(train)

    predict = commands.add_parser(
        "predict", help="label new audio with a trained model on Ray Data: one row per file, CSV or Parquet"
    )
    _config_args(predict)
    predict.add_argument(
        "--model",
        required=True,
        help="runs:/<run id>/model, models:/NAME/VERSION, a local model folder, or a CV run id (its fold "
        "models as an ensemble)",
    )
    predict.add_argument("--out", required=True, type=Path, help="file to write (.csv or .parquet)")
    predict.add_argument(
        "--on-error",
        choices=["fail", "skip"],
        default=argparse.SUPPRESS,
        help="fail (default): list every bad file and write nothing; skip: score the others and list "
        "the bad ones in <out>.skipped.txt",
    )
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files, folders, manifest CSVs")

    sweep = commands.add_parser(
        "sweep", help="Ray Tune sweep over sweep.space: each trial a CV over sweep.folds, tracked in MLflow"
    )
    _config_args(sweep)
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="continue this experiment.name's sweep (Tuner.restore): finished trials kept, failed retried",
    )

    report = commands.add_parser(
        "report", help="print the per-fold WAR/UAR table of a past CV run from MLflow"
    )
    _config_args(report)
    report.add_argument("--run", help="the CV run's MLflow id (default: the experiment's latest CV run)")
    report.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment)")
    report.add_argument("--sweep", metavar="NAME", help="one row per trial of this sweep (experiment.name)")
    report.add_argument("--csv", metavar="FILE", help="also write the table as CSV")

    verify = commands.add_parser(
        "verify-cache",
        help="recompute every checksum of every artifact in experiment.cache_dir (routine loads check sizes)",
    )
    _config_args(verify)
    verify.add_argument(
        "--remove-damaged", action="store_true", help="delete damaged artifacts (the next run rebuilds them)"
    )

    sync = commands.add_parser(
        "tracking-sync", help="send to MLflow what waited out a tracking outage in tracking-offline files"
    )
    sync.add_argument("files", nargs="+", type=Path, help="<output_dir>/tracking-offline/*.jsonl")
    sync.add_argument(
        "--uri",
        help="the MLflow server the files' records are for (default: MLFLOW_TRACKING_URI, else the embedded "
        "store of the output folder each file is in); never taken from the file",
    )

    show = commands.add_parser("config", help="print the fully resolved config (defaults filled in)")
    _config_args(show)
    return parser


def _load(args: argparse.Namespace, extra: list[str] = ()) -> Config:
    """The validated config with absolute paths (workers, trials and tasks run in other directories and
    on other nodes); in a submitted job a relative path is an error, since it would land in the job's
    scratch copy of the working dir."""
    from .runtime import RELATIVE_IN_A_JOB, in_submitted_job

    config = load_config(getattr(args, "config", None), [*getattr(args, "overrides", []), *extra])
    return with_absolute_paths(config, RELATIVE_IN_A_JOB if in_submitted_job() else None)


def _prepare_overrides(args: argparse.Namespace) -> list[str]:
    if args.corpus == "iemocap":
        overrides = ["data.source=iemocap", f"data.root={args.root}", f"data.manifest={args.out}"]
    elif args.corpus == "demo":
        out = Path(args.out)
        overrides = [
            "data.source=demo",
            f"data.root={out / 'IEMOCAP_demo'}",
            f"data.manifest={out / 'manifest.csv'}",
        ]
    elif args.corpus == "manifest":
        overrides = ["data.source=manifest", f"data.csv={args.csv}", f"data.manifest={args.out}"]
    else:
        overrides = []
    if hasattr(args, "on_error"):
        overrides.append(f"data.on_error={args.on_error}")
    return overrides


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.manifest import format_summary
    from .data.prepare import prepare

    config = _load(args, _prepare_overrides(args))
    result = prepare(config.data, strict=getattr(args, "strict", False))
    say(format_summary(result.manifest, f"{config.data.source} manifest {result.path}"))
    if result.dropped:
        dropped = "  ".join(f"{k} {v}" for k, v in sorted(result.dropped.items()))
        say(f"  dropped  {dropped}  (labels outside data.emotions {config.data.emotions})")
    if result.problems:
        say(f"skipped {len(result.problems)} problem(s), listed in {result.skipped_path}:")
        for problem in result.problems:
            say(f"  {problem}")
    return 0


def _features(config: Config):
    """Manifest (prepared if missing), Ray, and the cached or freshly extracted feature store."""
    from .artifacts import ArtifactCache
    from .data.prepare import load_or_prepare
    from .devices import resolve_devices
    from .features import extract_features
    from .runtime import init_ray

    manifest = load_or_prepare(config.data)
    init_ray()
    config = resolve_devices(config)
    cache = ArtifactCache(config.experiment.cache_dir)
    store, built = extract_features(config, manifest, cache)
    meta = store.artifact.meta
    state = "extracted" if built else "reused"
    say(
        f"features {state}: {meta['utterances']} utterances, {meta['frames']} frames, "
        f"{meta['audio_s']:.0f} s of audio, layers {store.layers}, dim {store.dim} -> {store.path}"
    )
    if built:
        say(
            f"  {meta['seconds']:.1f} s on {meta['device']}: "
            f"{meta['audio_s_per_s']:.1f} audio seconds per second"
        )
    return config, manifest, cache, store


def cmd_extract(args: argparse.Namespace) -> int:
    _features(_load(args))
    return 0


def _gmps(config: Config, cache, store, layer: int):
    from .gmp import build_gmps_on_cluster

    gmps, built = build_gmps_on_cluster(store, layer, config.gmp, config.experiment.seed, None, cache)
    meta = gmps.meta
    say(
        f"GMPs {'built' if built else 'reused'} for layer {layer} ({meta['backend']}, "
        f"{meta['sampled_frames']} of {meta['fit_frames']} frames sampled) -> {gmps.path}"
    )
    for k in gmps.scales:
        say(
            f"  k={k:<5} inertia/frame {meta['inertia_per_frame'][str(k)]:.4f}  "
            f"fit {meta['fit_seconds'][str(k)]:.1f} s"
        )
    return gmps


def cmd_cluster(args: argparse.Namespace) -> int:
    config, _, cache, store = _features(_load(args))
    _gmps(config, cache, store, config.gmp.layer)
    return 0


def cmd_gmp_report(args: argparse.Namespace) -> int:
    import pandas as pd

    from .gmp_report import backbone_name, label_quality, report_backbones, save_report, to_markdown

    tables = []
    for experiment in report_backbones(_load(args)):
        config, manifest, cache, store = _features(experiment)
        gmps = [_gmps(config, cache, store, layer) for layer in store.layers]
        tables += [label_quality(labels, manifest, backbone_name(config)) for labels in gmps]
    table = pd.concat(tables)
    paths = save_report(table, Path(config.experiment.output_dir) / "reports")
    say(to_markdown(table))
    say(f"saved {paths['csv']}, {paths['markdown']} and {paths['plot']}")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from .data.manifest import format_summary
    from .data.prepare import load_or_prepare

    config = _load(args)
    manifest = load_or_prepare(config.data)
    say(format_summary(manifest, f"{config.data.source} manifest {config.data.manifest}"))
    chosen = _folds(manifest, args.folds.split(",") if args.folds else None, "--folds")
    from .artifacts import ArtifactCache  # the pipeline's imports take seconds: a bad --folds fails first
    from .pipeline import run_cv
    from .runtime import init_ray
    from .tracking import Tracker

    init_ray()
    tracker = Tracker(config.tracking.experiment, config.tracking.uri, config.experiment.output_dir)
    table = run_cv(config, manifest, chosen, ArtifactCache(config.experiment.cache_dir), tracker)
    say(table.to_markdown(index=False, floatfmt=".4f"))
    say(
        f"mean WAR {table['war'].mean():.1%} (std {table['war'].std(ddof=0):.1%})  "
        f"mean UAR {table['uar'].mean():.1%} (std {table['uar'].std(ddof=0):.1%})  MLflow: {tracker.server}"
    )
    say(f"MLflow UI: {tracker.ui_link()}")
    say(f"tables and figures: {table.attrs['reports']}")
    run = table.attrs["mlflow_run"]
    if config.tracking.log_model and not run.startswith("offline-"):
        count = f"{len(chosen)} fold model(s)" + (" (an ensemble)" if len(chosen) > 1 else "")
        say(f"Label new audio with this CV's {count}, for instance fold {chosen[0]}'s session:")
        say("  " + _predict_command(args, run, config, _example_input(config, chosen[0])))
        _credentials_note(tracker)
    return 0


def _credentials_note(tracker) -> None:
    """Commands printed with the tracking URI's credentials redacted need them back to run."""
    if tracker.server != tracker.uri:
        say(
            f"  ({REDACTED} marks the tracking URI's credentials, left out: put them back, or give them in "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
        )


def _predict_command(args: argparse.Namespace, model: str, config: Config, inputs: str) -> str:
    """The ``gmpatl predict`` command line that labels ``inputs`` with ``model``, runnable as printed
    from here (the same program, config file and overrides as this command)."""
    import os
    import shlex

    program = sys.argv[0] if Path(sys.argv[0]).name == "gmpatl" else "gmpatl"
    words = [program, "predict"]
    if getattr(args, "config", None):
        words += ["--config", args.config]
    if getattr(args, "overrides", None):
        words += ["--set", *args.overrides]
    out = Path(config.experiment.output_dir) / "predictions.csv"
    here = Path.cwd()
    shown = [os.path.relpath(p) if Path(p).is_relative_to(here) else p for p in (str(out), inputs)]
    return shlex.join([*words, "--model", model, "--out", *shown])


def _example_input(config: Config, fold) -> str:
    """Audio to try a model on: fold ``fold``'s session folder of an IEMOCAP-layout corpus, else the
    manifest (a CSV with a ``path`` column is an input too)."""
    if config.data.source in ("iemocap", "demo"):
        folder = Path(config.data.root) / f"Session{fold}" / "sentences" / "wav"
        if folder.is_dir():
            return str(folder)
    return str(config.data.manifest)


def cmd_train(args: argparse.Namespace) -> int:
    import shlex

    from .artifacts import ArtifactCache
    from .data.manifest import format_summary
    from .data.prepare import load_or_prepare
    from .pipeline import run_final
    from .runtime import init_ray
    from .tracking import Tracker

    config = _load(args)
    manifest = load_or_prepare(config.data)
    say(format_summary(manifest, f"{config.data.source} manifest {config.data.manifest}"))
    init_ray()
    tracker = Tracker(config.tracking.experiment, config.tracking.uri, config.experiment.output_dir)
    final = run_final(config, manifest, ArtifactCache(config.experiment.cache_dir), tracker)
    say(
        f"final model: best validation UAR {final.best_val_uar:.1%}; "
        f"MLflow run {final.run} at {tracker.server}"
    )
    say(f"MLflow UI: {tracker.ui_link()}")
    if final.model is None:
        return 0
    say(f"  model folder {final.model}")
    if final.run.startswith("offline-"):  # MLflow was away: its records wait (the warning named the file)
        say("Label new audio with the model folder (MLflow has not got the run yet):")
        say("  " + _predict_command(args, str(final.model), config, _example_input(config, 1)))
        return 0
    uri = f"runs:/{final.run}/model"
    if config.tracking.register_model and not final.registered:
        say(f"  registering it as {config.tracking.register_model} waits with the tracking records")
    if final.registered:
        name, version = final.registered.split("/")
        uri = f"models:/{name}/{version}"
        say(f"  registered as {final.registered} in the MLflow model registry")
    say("Label new audio with it:")
    say("  " + _predict_command(args, uri, config, _example_input(config, 1)))
    say("Serve it over HTTP (POST /invocations, README 'Use a trained model'):")
    serve = f"mlflow models serve -m {uri} --env-manager local -h 127.0.0.1 -p 5001"
    bin_dir = Path(sys.executable).parent  # MLflow starts uvicorn from the PATH: this environment's
    environment = f"PATH={shlex.quote(str(bin_dir))}:$PATH MLFLOW_TRACKING_URI={shlex.quote(tracker.server)}"
    say(f"  {environment} {serve}")
    _credentials_note(tracker)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import run_predict, skipped_path
    from .runtime import init_ray

    overrides = [f"predict.on_error={args.on_error}"] if hasattr(args, "on_error") else []
    config = _load(args, overrides)
    init_ray()
    predictions = run_predict(config, args.model, args.inputs, args.out)
    table = predictions.table
    counts = "  ".join(f"{k} {v}" for k, v in table["emotion"].value_counts().sort_index().items())
    members = f"an ensemble of {predictions.models} models" if predictions.models > 1 else "the model"
    say(f"labelled {len(table)} file(s) with {members} -> {args.out}  ({counts})")
    if predictions.problems:
        say(f"skipped {len(predictions.problems)} file(s), listed in {skipped_path(args.out)}:")
        for problem in predictions.problems:
            say(f"  {problem}")
    return 0


def _folds(manifest, wanted: list | None, what: str) -> list:
    """The manifest's folds named in ``wanted`` (all when None), in that order; unknown ones are an error."""
    from .data.manifest import folds

    available = folds(manifest)
    if wanted is None:
        return available
    by_name = {str(f): f for f in available}
    unknown = [str(f) for f in wanted if str(f) not in by_name]
    if unknown:
        listed = ",".join(str(f) for f in wanted)
        raise InputError(f"{what} {listed}: no fold {unknown}; the manifest's folds are {available}")
    return [by_name[str(f)] for f in wanted]


def cmd_sweep(args: argparse.Namespace) -> int:
    from .data.prepare import load_or_prepare
    from .runtime import init_ray
    from .sweep import run_sweep

    config = _load(args)
    if config.sweep is None:
        raise InputError("gmpatl sweep needs a config with a sweep section (see configs/sweep.yaml)")
    manifest = load_or_prepare(config.data)
    chosen = _folds(manifest, config.sweep.folds, "sweep.folds")
    init_ray()
    table = run_sweep(config, manifest, chosen, resume=args.resume)
    say(table.to_markdown(index=False, floatfmt=".4f"))
    failed = (table["status"] != "finished").sum()
    if failed:  # the sweep went on without them; `--resume` retries them
        say(f"{failed} of {len(table)} trial(s) failed (after sweep.max_failures retries each)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import cv_report, format_report, format_sweep, sweep_report
    from .tracking import tracking_uri

    config = _load(args)
    uri = tracking_uri(config.tracking.uri, config.experiment.output_dir)
    experiment = args.experiment or config.tracking.experiment
    if args.sweep:
        table = sweep_report(uri, experiment, args.sweep)
        say(f"sweep {args.sweep!r} in experiment {experiment!r} at {scrub(uri)}: {len(table)} trial(s)")
        say(format_sweep(table))
    else:
        run_id, table = cv_report(uri, experiment, args.run)
        say(f"CV run {run_id} in experiment {experiment!r} at {scrub(uri)}")
        say(format_report(table))
    if args.csv:
        atomic_write_text(args.csv, table.to_csv(index=False, float_format="%.4f"))
        say(f"saved {args.csv}")
    return 0


def cmd_verify_cache(args: argparse.Namespace) -> int:
    import shutil

    from .artifacts import ArtifactCache

    cache = ArtifactCache(_load(args).experiment.cache_dir)
    checked, damaged = cache.verify()
    say(f"{cache.root}: {checked} artifact(s) checked in full, {len(damaged)} damaged")
    for folder, problems in damaged.items():
        for problem in problems:
            say(f"  {problem}")
        if args.remove_damaged:
            shutil.rmtree(folder)
            say(f"  removed {folder}: the next run that needs it builds it again")
    return 1 if damaged else 0


def cmd_tracking_sync(args: argparse.Namespace) -> int:
    from .tracking import Tracker

    refused, waiting = 0, 0
    for path in args.files:
        try:
            tracker = Tracker.from_offline_file(path, args.uri)
        except InputError as err:  # this file is refused; the others are still sent
            say(f"gmpatl tracking-sync: error: {err}", err=True)
            refused += 1
            continue
        count = len(tracker.pending)
        say(f"{path}: sending {count} record(s) to MLflow at {tracker.server}")
        if tracker.flush():
            refused = tracker.refused
            kept = f"; {refused} refused, kept in {tracker.queue.dead_letter}" if refused else ""
            say(f"{path}: sent {count - refused} record(s) to {tracker.server}{kept}")
        else:
            waiting += 1
            say(
                f"{path}: {tracker.server} does not take them ({tracker.last_error}); "
                f"{len(tracker.pending)} record(s) wait in {tracker.offline}"
            )
    return EXIT_BAD_INPUT if refused else 1 if waiting else 0


def cmd_config(args: argparse.Namespace) -> int:
    say(dump_config(_load(args)).rstrip("\n"))
    return 0


COMMANDS = {
    "prepare": cmd_prepare,
    "extract": cmd_extract,
    "cluster": cmd_cluster,
    "gmp-report": cmd_gmp_report,
    "cv": cmd_cv,
    "train": cmd_train,
    "predict": cmd_predict,
    "sweep": cmd_sweep,
    "report": cmd_report,
    "verify-cache": cmd_verify_cache,
    "tracking-sync": cmd_tracking_sync,
    "config": cmd_config,
}


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand with everything it prints scrubbed of secrets, tracebacks included; a command
    that runs on Ray writes its libraries' output to a run log and shows its own on the console."""
    # The MLflow client prints two lines per ended run on an HTTP server ("View run ... at: URL"): dozens
    # in a CV, and the run table says it better (`gmpatl report`, the MLflow UI).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    with scrubbed_console():
        args = build_parser().parse_args(argv)
        try:
            logged = args.command in LOGGED
            with run_log(_load(args).experiment.output_dir, args.command) if logged else nullcontext():
                return COMMANDS[args.command](args)
        except (InputError, FileExistsError) as err:
            say(f"gmpatl {args.command}: error: {err}", err=True)
            return EXIT_BAD_INPUT
        except Exception:
            traceback.print_exc()
            return 1
        except KeyboardInterrupt:
            traceback.print_exc()
            return 130


if __name__ == "__main__":
    sys.exit(main())
