"""A trained model on new audio: the model folder and its MLflow pyfunc, `gmpatl predict` on Ray Data,
`gmpatl train` (the final model, registered), and `mlflow models serve` answering over HTTP."""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from conftest import REPO, TINY_TRAINING, small_config
from processes import free_port
from test_cli import run

from gmpatl_ray.config import dump_config
from gmpatl_ray.data.audio import load_audio
from gmpatl_ray.errors import InputError
from gmpatl_ray.inference import (
    EmotionPredictor,
    ModelFolderError,
    example_wave,
    rows_audio,
    save_model_folder,
    wav_base64,
    window_bounds,
)
from gmpatl_ray.metrics import uar, war
from gmpatl_ray.predict import list_inputs, resolve_model

BIN = Path(sys.executable).parent
EMOTIONS = ["ang", "hap", "neu", "sad"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A randomly initialised stage-3 model of the tiny HuBERT, packaged as a model folder."""
    import torch

    from gmpatl_ray.models.backbone import load_backbone
    from gmpatl_ray.stages.stage3 import Stage3Model
    from gmpatl_ray.training import save_model

    here = tmp_path_factory.mktemp("model")
    config = small_config(here, *TINY_TRAINING)
    torch.manual_seed(0)
    save_model(Stage3Model(load_backbone(config.backbone), config), here / "weights")
    return save_model_folder(here / "model", here / "weights", config)


def test_registering_needs_a_logged_model():
    from gmpatl_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="tracking: .*register_model needs log_model: true"):
        load_config(None, ["tracking.register_model=x", "tracking.log_model=false"])


def test_windows_cover_the_file_in_equal_parts():
    assert window_bounds(100, 100) == [(0, 100)]
    assert window_bounds(250, 100) == [(0, 83), (83, 166), (166, 250)]
    for n, w in [(1, 7), (7, 7), (8, 7), (1000, 33)]:
        bounds = window_bounds(n, w)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a2 == b1 for (_, b1), (a2, _) in zip(bounds, bounds[1:], strict=False))
        assert (
            max(b - a for a, b in bounds) <= w
            and max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
        )


def test_a_long_file_is_the_length_weighted_mean_of_its_windows(model_folder):
    whole = EmotionPredictor.from_model_folder(model_folder)
    windowed = EmotionPredictor.from_model_folder(model_folder)
    windowed.window_samples = 16000  # 1-s windows
    rng = np.random.default_rng(0)
    long = (example_wave(16000, 2.5) + 0.05 * rng.standard_normal(40000)).astype(np.float32)
    short = example_wave(16000, 0.8)
    got = windowed.probabilities([long, short])
    parts = [long[a:b] for a, b in window_bounds(len(long), 16000)]
    assert len(parts) == 3
    each = whole.probabilities(parts)
    lengths = np.array([len(p) for p in parts], dtype=float)
    assert got[0] == pytest.approx((each * lengths[:, None]).sum(0) / lengths.sum(), abs=1e-6)
    assert got[1] == pytest.approx(whole.probabilities([short])[0], abs=1e-6)  # one window: as it is
    assert np.log(whole.probabilities([long])[0]) != pytest.approx(np.log(got[0]), abs=1e-3)  # they matter
    assert got.sum(1) == pytest.approx([1.0, 1.0])


def test_an_ensemble_averages_its_models_probabilities(model_folder, tmp_path):
    import torch

    from gmpatl_ray.inference import Ensemble, model_folder_parts
    from gmpatl_ray.models.backbone import load_backbone
    from gmpatl_ray.stages.stage3 import Stage3Model
    from gmpatl_ray.training import save_model

    _, config = model_folder_parts(model_folder)
    torch.manual_seed(1)
    save_model(Stage3Model(load_backbone(config.backbone, seed=1), config), tmp_path / "weights")
    other = save_model_folder(tmp_path / "other", tmp_path / "weights", config)
    members = [EmotionPredictor.from_model_folder(f) for f in (model_folder, other)]
    waves = [example_wave(16000, 1.2), example_wave(16000, 0.6)]
    each = [m.probabilities(waves) for m in members]
    assert each[0] != pytest.approx(each[1], abs=1e-3)
    assert Ensemble(members).probabilities(waves) == pytest.approx((each[0] + each[1]) / 2, abs=1e-12)


def test_pyfunc_input_needs_one_readable_source_per_row(model_folder, tmp_path):
    with pytest.raises(InputError, match=r"needs a 'path' or an 'audio' column \(it has \['wav'\]\)"):
        rows_audio(pd.DataFrame({"wav": ["x"]}), 16000)
    with pytest.raises(InputError, match="row 0: give exactly one of 'path' and 'audio'"):
        rows_audio(
            pd.DataFrame({"path": ["a.wav"], "audio": [wav_base64(example_wave(16000), 16000)]}), 16000
        )
    with pytest.raises(InputError, match="row 1: 'audio' is not base64"):
        rows_audio(pd.DataFrame({"audio": [wav_base64(example_wave(16000), 16000), "not base64!"]}), 16000)
    junk = base64.b64encode(b"RIFF but not a wav").decode()
    with pytest.raises(InputError, match=r"row 0 \(audio\): cannot decode audio"):
        rows_audio(pd.DataFrame({"audio": [junk]}), 16000)
    missing = tmp_path / "gone.wav"
    with pytest.raises(InputError, match=f"{missing}: file not found"):
        rows_audio(pd.DataFrame({"path": [str(missing)]}), 16000)
    # Bytes at another rate and channel count are resampled and averaged as files are.
    stereo = np.stack([example_wave(8000), example_wave(8000)], axis=1)
    sf.write(tmp_path / "stereo.wav", stereo, 8000)
    from_bytes = rows_audio(
        pd.DataFrame({"audio": [base64.b64encode((tmp_path / "stereo.wav").read_bytes())]}), 16000
    )
    from_path = rows_audio(pd.DataFrame({"path": [str(tmp_path / "stereo.wav")]}), 16000)
    assert len(from_path[0]) == 16000 and np.array_equal(from_bytes[0], from_path[0])


def test_a_folder_that_is_not_a_model_is_refused_naming_what_is_missing(model_folder, tmp_path):
    with pytest.raises(ModelFolderError, match=f"{tmp_path}: not an MLflow model folder"):
        EmotionPredictor.from_model_folder(tmp_path)
    import shutil

    broken = shutil.copytree(model_folder, tmp_path / "broken")
    (broken / "artifacts" / "weights" / "heads.pt").unlink()
    with pytest.raises(
        ModelFolderError, match=r"not a gmpatl model \(artifacts/weights/heads.pt is missing\)"
    ):
        EmotionPredictor.from_model_folder(broken)


def test_inputs_are_files_folders_and_manifests_each_once(tmp_path):
    audio = tmp_path / "audio"
    (audio / "deep" / "er").mkdir(parents=True)
    for name in ("b.wav", "a.flac", "deep/er/c.WAV"):
        sf.write(audio / name, example_wave(16000, 0.1), 16000)
    (audio / "notes.txt").write_text("not audio")
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,speaker\naudio/b.wav,x\n")
    found = list_inputs([str(audio / "b.wav"), str(audio), str(manifest)])
    assert found == [str(audio / n) for n in ("b.wav", "a.flac", "deep/er/c.WAV")]
    with pytest.raises(InputError, match=f"{tmp_path / 'nope'}: no such file or folder"):
        list_inputs([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no audio files in this folder"):
        list_inputs([str(tmp_path / "empty")])
    (tmp_path / "none.csv").write_text("path\n")
    with pytest.raises(InputError, match=r"none.csv: no rows"):
        list_inputs([str(tmp_path / "none.csv")])
    (tmp_path / "gaps.csv").write_text("path,speaker\naudio/b.wav,x\n,y\n")
    with pytest.raises(InputError, match=r"gaps.csv: empty path on line\(s\) \[3\]"):
        list_inputs([str(tmp_path / "gaps.csv")])
    (tmp_path / "bad.csv").write_text("file\nx.wav\n")
    with pytest.raises(InputError, match=r"bad.csv: a manifest needs a 'path' column \(it has \['file'\]\)"):
        list_inputs([str(tmp_path / "bad.csv")])


def test_a_model_or_an_output_it_cannot_use_is_refused_naming_it(tmp_path):
    from gmpatl_ray.config import load_config
    from gmpatl_ray.predict import run_predict

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(InputError, match="--model nonsense: not a model folder, a runs:/ or models:/ URI"):
        resolve_model("nonsense", uri, tmp_path)
    with pytest.raises(InputError, match="--model models:/nothing/1: MLflow at .* has no such model"):
        resolve_model("models:/nothing/1", uri, tmp_path)
    with pytest.raises(InputError, match=r"--out .*labels.txt: write predictions as .csv or .parquet"):
        run_predict(load_config(None), "nonsense", [str(tmp_path)], tmp_path / "labels.txt")


def printed_command(stdout: str) -> list[str]:
    """The `gmpatl predict` line a `gmpatl cv` or `gmpatl train` printed, as argv."""
    (line,) = [line for line in stdout.splitlines() if " predict " in line and "--model" in line]
    return shlex.split(line)


@pytest.mark.slow
def test_predict_as_printed_reproduces_the_folds_test_scores(
    tracked_cv, trained_fold, small_corpus, ray_cluster
):
    """`gmpatl cv` ends with a predict command; run as printed, it labels fold 1's session folder with the
    CV's model, and on the fold's test utterances gives the CV's own predictions, so its WAR and UAR."""
    _, manifest = small_corpus
    _, trained = trained_fold
    command = printed_command(tracked_cv["result"].stdout)
    assert command[0] == str(BIN / "gmpatl")  # the program the CV ran as: runnable as printed
    result = run(*command, env=ray_cluster)
    assert result.returncode == 0, result.stderr[-3000:]
    out = Path(command[command.index("--out") + 1])
    table = pd.read_csv(out if out.is_absolute() else REPO / out)
    assert list(table.columns) == ["path", "emotion", *(f"p_{e}" for e in EMOTIONS)]
    folder = Path(command[-1])
    assert sorted(table["path"]) == sorted(str(p) for p in folder.rglob("*.wav"))  # labelled or not
    assert table[[f"p_{e}" for e in EMOTIONS]].sum(axis=1).to_numpy() == pytest.approx(1.0, abs=1e-5)

    test = manifest[manifest["session"] == 1].merge(table, on="path", suffixes=("", "_predicted"))
    assert len(test) == trained.test_utterances
    expected = trained.artifacts["stage3"].meta["test"]["predictions"]
    assert dict(zip(test["utt_id"], test["emotion_predicted"], strict=True)) == expected
    assert war(test["emotion"], test["emotion_predicted"]) == trained.war
    assert uar(test["emotion"], test["emotion_predicted"]) == trained.uar


@pytest.mark.slow
def test_predict_names_every_bad_file_and_skips_them_when_told(
    tracked_cv, small_corpus, ray_cluster, tmp_path
):
    """A fold run's `runs:/` model on a manifest CSV and a folder holding an 8-kHz stereo file, a corrupt and
    an empty wav: `fail` lists both bad files and writes nothing; `skip` writes the good rows as Parquet and
    lists the bad ones beside it; the resampled file scores as the model scores it in process."""
    from mlflow import MlflowClient

    _, manifest = small_corpus
    client = MlflowClient(tracking_uri=tracked_cv["uri"])
    (fold_run,) = client.search_runs(
        [client.get_experiment_by_name("cv-test").experiment_id], "attributes.run_name = 'fold-1'"
    )
    good = manifest["path"].tolist()[:2]
    listed = tmp_path / "new.csv"
    pd.DataFrame({"path": good}).to_csv(listed, index=False)
    folder = tmp_path / "incoming"
    folder.mkdir()
    wave = load_audio(good[0], 16000)
    sf.write(folder / "phone.wav", np.stack([wave[::2], wave[::2]], axis=1), 8000)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunkjunkjunk")
    (folder / "empty.wav").write_bytes(b"")
    sf.write(folder / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)  # only decoding finds it
    sf.write(folder / "click.wav", wave[:100], 16000)  # under HuBERT's 400-sample receptive field
    out = tmp_path / "labels.parquet"
    args = [str(BIN / "gmpatl"), "predict", "--config", str(tracked_cv["config"])]
    args += ["--set", "predict.window_s=0.5"]  # the command's own window, not the model's training config
    args += ["--model", f"runs:/{fold_run.info.run_id}/model", "--out", str(out), str(listed), str(folder)]

    failed = run(*args, env=ray_cluster)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "4 input file(s) cannot be scored; nothing was written" in failed.stderr
    assert f"{folder / 'corrupt.wav'}: unreadable audio header" in failed.stderr
    assert f"{folder / 'empty.wav'}: empty file (0 bytes)" in failed.stderr
    assert f"{folder / 'silent.wav'}: silent: every sample is 0" in failed.stderr
    assert f"{folder / 'click.wav'}: too short: 0.0063 s, the model needs 0.0250 s" in failed.stderr
    assert not out.exists()

    skipped = run(*args, "--on-error", "skip", env=ray_cluster)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "skipped 4 file(s)" in skipped.stdout
    table = pd.read_parquet(out)
    assert table["path"].tolist() == [*good, str(folder / "phone.wav")]
    problems = (tmp_path / "labels.parquet.skipped.txt").read_text().splitlines()
    assert [p.split(":")[0] for p in problems] == [
        str(folder / n) for n in ("click.wav", "corrupt.wav", "empty.wav", "silent.wav")
    ]

    model = Path(client.download_artifacts(fold_run.info.run_id, "model", str(tmp_path / "model")))
    phone = load_audio(folder / "phone.wav")
    in_process = EmotionPredictor.from_model_folder(model, window_s=0.5).probabilities([phone])
    unwindowed = EmotionPredictor.from_model_folder(model).probabilities([phone])
    assert np.log(in_process[0]) != pytest.approx(np.log(unwindowed[0]), abs=1e-3)  # the window counts
    assert table.iloc[2][[f"p_{e}" for e in EMOTIONS]].to_numpy(float) == pytest.approx(
        in_process[0], abs=1e-6
    )


@pytest.fixture(scope="module")
def final_model(small_corpus, ray_cluster, tmp_path_factory):
    """`gmpatl train` on the small corpus with ``tracking.register_model``: every stage on all the data,
    in a cache of its own. Returns the config file, the MLflow URI and the finished process."""
    folder, _ = small_corpus
    here = tmp_path_factory.mktemp("final")
    config_file = here / "final.yaml"
    overrides = [
        f"experiment.output_dir={here / 'out'}",
        f"experiment.cache_dir={here / 'cache'}",
        "tracking.experiment=final-test",
        "tracking.register_model=gmpatl-test",
        *TINY_TRAINING,
        "train.num_workers=0",  # local mode: the stages in `gmpatl train` itself (Ray Train has its tests)
    ]
    config_file.write_text(dump_config(small_config(folder, *overrides)))
    result = run(str(BIN / "gmpatl"), "train", "--config", str(config_file), env=ray_cluster, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"config": config_file, "uri": f"sqlite:///{here / 'out' / 'mlflow.db'}", "result": result}


@pytest.mark.slow
def test_train_makes_a_registered_final_model_on_all_the_data(final_model, small_corpus, ray_cluster):
    from mlflow import MlflowClient

    _, manifest = small_corpus
    client = MlflowClient(tracking_uri=final_model["uri"])
    experiment = client.get_experiment_by_name("final-test")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["final-gmpatl-demo", "final-stage1", "final-stage2", "final-stage3"]
    final = runs["final-gmpatl-demo"]
    assert final.data.tags["gmpatl.kind"] == "final" and final.info.status == "FINISHED"
    assert final.data.tags["gmpatl.registered_model"] == "gmpatl-test/1"
    metrics = final.data.metrics
    assert metrics["train_utterances"] + metrics["val_utterances"] == len(manifest)  # no fold held out
    assert 0 <= metrics["best_val_uar"] <= 1
    artifacts = {a.path for a in client.list_artifacts(final.info.run_id)}
    assert artifacts == {"config.yaml", "curves_final.png", "model"}
    (version,) = client.search_model_versions("name = 'gmpatl-test'")
    assert str(version.version) == "1" and version.run_id == final.info.run_id

    command = printed_command(final_model["result"].stdout)  # models:/gmpatl-test/1, as printed
    assert command[command.index("--model") + 1] == "models:/gmpatl-test/1"
    command[0] = str(BIN / "gmpatl")
    result = run(*command, env=ray_cluster)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"labelled {len(list(Path(command[-1]).rglob('*.wav')))} file(s) with the model" in result.stdout


@pytest.mark.slow
def test_the_registered_model_serves_over_http_as_it_predicts_in_process(final_model, small_corpus, tmp_path):
    """`mlflow models serve -m models:/NAME/1 --env-manager local` on 127.0.0.1 answers a base64 WAV as
    `mlflow.pyfunc.load_model("runs:/<final run>/model")` answers in a fresh process and the model folder's
    predictor here; a bad row is an HTTP 400 naming the row."""
    from mlflow import MlflowClient

    _, manifest = small_corpus
    uri, env = "models:/gmpatl-test/1", {"MLFLOW_TRACKING_URI": final_model["uri"]}
    wave = load_audio(manifest["path"].iloc[0], 16000)
    request = {"dataframe_split": {"columns": ["audio"], "data": [[wav_base64(wave, 16000)]]}}
    (tmp_path / "request.json").write_text(json.dumps(request))
    (version,) = MlflowClient(tracking_uri=final_model["uri"]).search_model_versions("name = 'gmpatl-test'")
    run_uri = f"runs:/{version.run_id}/model"

    fresh = run(
        sys.executable,
        "-c",
        "import json, sys, mlflow.pyfunc, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model({run_uri!r})\n"
        "frame = pd.DataFrame(**{k: v for k, v in json.load(open(sys.argv[1]))['dataframe_split'].items()})\n"
        "print(model.predict(frame).to_json(orient='records'))",
        str(tmp_path / "request.json"),
        env=env,
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    (loaded,) = json.loads(fresh.stdout.strip().splitlines()[-1])

    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local"]
        + ["-h", "127.0.0.1", "-p", str(port)],
        # As a user runs it from the activated venv: MLflow starts `uvicorn` from the PATH.
        env={
            **os.environ,
            **env,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as ping:
                    if ping.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the model server did not come up: {server.stderr.read()[-3000:]}")
                time.sleep(0.5)
        post = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
        )
        started = time.perf_counter()
        with urllib.request.urlopen(post, timeout=60) as answer:
            body = json.loads(answer.read())
        print(f"served answer for a {len(wave) / 16000:.1f}-s file in {time.perf_counter() - started:.3f} s")
        bad = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"dataframe_records": [{"audio": "not base64!"}]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=60)
        assert refused.value.code == 400
        assert "row 0: 'audio' is not base64" in refused.value.read().decode()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    (served,) = body["predictions"]
    (folder,) = resolve_model(uri, final_model["uri"], tmp_path)
    here = EmotionPredictor.from_model_folder(folder).probabilities([wave])[0]
    assert served["emotion"] == loaded["emotion"] == EMOTIONS[int(here.argmax())]
    for i, emotion in enumerate(EMOTIONS):
        assert served[f"p_{emotion}"] == pytest.approx(loaded[f"p_{emotion}"], abs=1e-6)
        assert served[f"p_{emotion}"] == pytest.approx(here[i], abs=1e-6)
