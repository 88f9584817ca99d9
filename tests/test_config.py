"""Typed config: paper defaults, the shipped YAMLs, overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gmpatl_ray.cli import main
from gmpatl_ray.config import PATH_FIELDS, Config, ConfigError, dump_config, load_config, with_absolute_paths
from gmpatl_ray.runtime import JOB_CONFIG_ENV, RELATIVE_IN_A_JOB

CONFIGS = Path(__file__).parent.parent / "configs"


def test_defaults_are_the_papers_values():
    c = load_config(None)
    assert c.data.emotions == ["ang", "hap", "neu", "sad"] and c.data.merge == {"exc": "hap"}
    assert c.backbone.pretrained == "facebook/hubert-base-ls960" and c.backbone.random_init is None
    assert c.stage1.alpha_e == 0.9
    assert c.gmp.layer == -3 and c.gmp.scales == [64, 512, 4096]
    assert (c.stage3.loss, c.stage3.scale, c.stage3.margin) == ("amsoftmax", 30.0, 0.2)
    for stage in (c.stage1, c.stage2, c.stage3):
        assert (stage.optim.name, stage.optim.lr, stage.optim.batch_size) == ("adam", 1e-4, 64)


def test_iemocap_yaml_states_the_defaults():
    from_file = load_config(CONFIGS / "iemocap.yaml")
    defaults = load_config(None)
    for section in ("stage1", "gmp", "stage2", "stage3"):
        assert getattr(from_file, section) == getattr(defaults, section), section


def test_the_papers_run_trains_on_gpu_workers_or_on_cpu_with_one_override():
    """Its train section asks for a GPU per worker at the paper's batch (the whole batch on one GPU:
    benchmarks/gpu_memory.py); the one override gives a CPU run that a 2-core machine can schedule."""
    on_gpu = load_config(CONFIGS / "iemocap.yaml").train
    assert on_gpu.use_gpu and on_gpu.num_workers == 1
    on_cpu = load_config(CONFIGS / "iemocap.yaml", ["train.use_gpu=false"]).train
    assert not on_cpu.use_gpu and on_cpu.num_workers * on_cpu.cpus_per_worker <= 2
    assert load_config(None).train.use_gpu is False  # the defaults stay CPU, for the demo and your corpus
    assert on_gpu.data_loaders() == 1 and on_cpu.data_loaders() == 0  # a loader process only beside a GPU
    assert load_config(None, ["train.loader_workers=3"]).train.data_loaders() == 3


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    config = load_config(path)
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(config))
    assert load_config(dumped) == config


def test_overrides_are_parsed_as_yaml():
    c = load_config(
        CONFIGS / "demo.yaml",
        ["stage1.alpha_e=0.8", "gmp.scales=[8, 16]", "stage3.loss=ce", "stage1.optim.lr=3e-4"],
    )
    assert c.stage1.alpha_e == 0.8 and c.gmp.scales == [8, 16] and c.stage3.loss == "ce"
    assert c.stage1.optim.lr == 3e-4
    demo = load_config(CONFIGS / "demo.yaml")
    assert c.stage1.optim.epochs == demo.stage1.optim.epochs  # the rest of the file's optim section stays


def test_errors_name_the_file_and_every_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1:\n  alpha_e: 1.5\n  lstm_hiden: 12\ngmp:\n  layer: 3\n  scales: [64, zero]\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert message.startswith(f"{bad}: invalid config (4 problem(s))")
    assert "stage1.alpha_e: Input should be less than or equal to 1 (got 1.5)" in message
    assert "stage1.lstm_hiden: Extra inputs are not permitted" in message
    assert "gmp.layer: Input should be less than 0 (got 3)" in message
    assert "gmp.scales.1: Input should be a valid integer" in message


def test_disk_and_evaluation_settings_are_checked():
    defaults = load_config(None).train
    assert (defaults.checkpoints_to_keep, defaults.keep_run_folders) == (1, False)
    assert (defaults.eval_batch_s, defaults.eval_max_duration_s) == (160.0, 20.0)
    with pytest.raises(
        ConfigError, match=r"train.checkpoints_to_keep: Input should be greater than 0 \(got 0\)"
    ):
        load_config(None, ["train.checkpoints_to_keep=0"])
    with pytest.raises(ConfigError, match=r"train.eval_batch_s: Input should be greater than 0 \(got -1\)"):
        load_config(None, ["train.eval_batch_s=-1"])


def test_the_worker_check_interval_must_be_positive():
    with pytest.raises(ConfigError, match=r"train.poll_interval_s: Input should be greater than 0 \(got 0\)"):
        load_config(None, ["train.poll_interval_s=0"])
    assert load_config(CONFIGS / "demo.yaml").train.poll_interval_s == 0.25
    assert load_config(None).train.poll_interval_s == 2.0  # Ray's own default unless a config says so


def test_strings_are_not_numbers():
    with pytest.raises(ConfigError, match=r"stage3.margin: Input should be a valid number \(got '0.2'\)"):
        load_config(None, ["stage3.margin='0.2'"])


def test_unknown_section_and_bad_override():
    with pytest.raises(ConfigError, match="stage4: Extra inputs are not permitted"):
        load_config(None, ["stage4.margin=0.1"])
    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        load_config(None, ["stage3.margin"])
    with pytest.raises(ConfigError, match="stage1.alpha_e is not a section"):
        load_config(CONFIGS / "iemocap.yaml", ["stage1.alpha_e.x=1"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="set exactly one of backbone.pretrained and backbone.random_init"):
        load_config(None, ["backbone.random_init={}"])
    with pytest.raises(ConfigError, match="source 'manifest' needs data.csv"):
        load_config(None, ["data.source=manifest"])
    with pytest.raises(ConfigError, match="data.merge maps onto \\['joy'\\]"):
        load_config(CONFIGS / "iemocap.yaml", ["data.merge={exc: joy}"])
    with pytest.raises(ConfigError, match="source 'iemocap' needs data.root"):
        load_config(None, ["data.on_error=skip"])  # a data section replaces the default one whole
    with pytest.raises(ConfigError, match="hidden_size must be a multiple of num_attention_heads"):
        load_config(CONFIGS / "demo.yaml", ["backbone.random_init.num_attention_heads=3"])
    with pytest.raises(ConfigError, match=r"batch_size 16 is the global batch .* train.num_workers 3$"):
        load_config(CONFIGS / "demo.yaml", ["train.num_workers=3"])


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("stage1: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_configs_are_immutable():
    with pytest.raises(ValueError):
        Config().stage1.alpha_e = 0.5


def test_folders_follow_the_output_dir_unless_set():
    moved = load_config(CONFIGS / "sweep.yaml", ["experiment.output_dir=/shared/gmpatl"])
    assert moved.experiment.cache_dir == "/shared/gmpatl/cache"
    assert moved.train.storage_path == "/shared/gmpatl/ray_train"
    assert moved.sweep.storage_path == "/shared/gmpatl/ray_tune"
    pinned = load_config(CONFIGS / "demo.yaml", ["experiment.cache_dir=/cache"])
    assert pinned.experiment.cache_dir == "/cache" and pinned.train.storage_path == "outputs/demo/ray_train"
    assert load_config(CONFIGS / "demo.yaml").sweep is None


def test_extends_merges_sections_field_by_field(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {CONFIGS / 'demo.yaml'}\nstage3: {{margin: 0.3}}\n")
    config, demo = load_config(child), load_config(CONFIGS / "demo.yaml")
    assert config.stage3.margin == 0.3 and config.stage3.optim == demo.stage3.optim
    assert config.backbone == demo.backbone
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends: loop.yaml extends itself"):
        load_config(loop)


def test_everything_a_run_writes_defaults_to_under_the_output_dir():
    demo = load_config(CONFIGS / "demo.yaml", ["experiment.output_dir=/shared/x"])
    assert demo.data.manifest == "/shared/x/manifest.csv" and demo.data.root == "/shared/x/IEMOCAP_demo"
    iemocap = load_config(CONFIGS / "iemocap.yaml", ["experiment.output_dir=/shared/y"])
    assert iemocap.data.manifest == "/shared/y/manifest.csv"
    assert iemocap.data.root == "/data/IEMOCAP_full_release"  # a corpus is read, not written: no default


def test_extends_takes_a_list_merged_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("stage3: {margin: 0.3, scale: 16}\nexperiment: {name: a}\n")
    (tmp_path / "b.yaml").write_text("stage3: {margin: 0.4}\n")
    (tmp_path / "both.yaml").write_text("extends: [a.yaml, b.yaml]\nstage1: {alpha_e: 0.7}\n")
    both = load_config(tmp_path / "both.yaml")
    assert (both.stage3.margin, both.stage3.scale, both.experiment.name) == (0.4, 16.0, "a")
    assert both.stage1.alpha_e == 0.7
    (tmp_path / "bad.yaml").write_text("extends: [a.yaml, 3]\n")
    with pytest.raises(ConfigError, match="bad.yaml: extends: expected the path of another config or a list"):
        load_config(tmp_path / "bad.yaml")


CLUSTER_CONFIGS = ["cluster.yaml", "cluster-table3.yaml", "cluster-table4.yaml", "cluster-backbones.yaml"]


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_cluster_configs_put_every_path_on_shared_storage_and_state_every_device(name):
    """On the cluster nothing may land on one node's disk, and no device may be left to the cluster of
    the moment (``auto`` with GPU nodes scaled to zero would pick the CPU)."""
    config = load_config(CONFIGS / name)
    raw = config.model_dump()
    for key in PATH_FIELDS:
        section, field = key.split(".")
        value = (raw.get(section) or {}).get(field)
        assert value is None or value.startswith("/mnt/shared/"), (key, value)
    assert config.backbone.pretrained.startswith("/mnt/shared/")
    swept = config.sweep.space.get("backbone.pretrained") if config.sweep else None
    assert swept is None or all(path.startswith("/mnt/shared/") for path in swept.grid), swept
    devices = (config.extract.device, config.gmp.backend, config.train.use_gpu, config.predict.device)
    assert devices == ("cuda", "cuml", True, "cuda")
    assert 0 < config.train.data_loaders() < config.train.cpus_per_worker and config.train.pin_memory
    assert config.tracking.uri == "http://127.0.0.1:5000"
    assert config.stage1 == load_config(CONFIGS / "iemocap.yaml").stage1  # the paper's method


@pytest.mark.parametrize("table", ["3", "4"])
def test_the_tables_on_the_cluster_are_the_tables_with_the_cluster_settings(table):
    on_cluster = load_config(CONFIGS / f"cluster-table{table}.yaml")
    local = load_config(CONFIGS / f"table{table}.yaml")
    assert on_cluster.experiment.name == local.experiment.name == f"gmpatl-table{table}"
    assert on_cluster.sweep.space == local.sweep.space
    launcher = yaml.safe_load((CONFIGS.parent / "cluster.yaml").read_text())
    gpus = launcher["available_node_types"]["gpu_worker"]["max_workers"]
    assert on_cluster.sweep.max_concurrent_trials == gpus  # a trial per GPU node, not 2 of 4 used


def test_paths_are_made_absolute_and_refused_relative_in_a_submitted_job(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    absolute = with_absolute_paths(load_config(CONFIGS / "demo.yaml")).model_dump()
    for key in PATH_FIELDS:
        section, field = key.split(".")
        value = (absolute.get(section) or {}).get(field)
        assert value is None or value.startswith(f"{tmp_path}/"), (key, value)
    with pytest.raises(ConfigError) as refused:
        with_absolute_paths(load_config(CONFIGS / "demo.yaml"), RELATIVE_IN_A_JOB)
    assert "experiment.output_dir: 'outputs/demo' is relative" in str(refused.value)
    assert "data.manifest: 'outputs/demo/manifest.csv' is relative" in str(refused.value)

    monkeypatch.setenv(JOB_CONFIG_ENV, "{}")  # what Ray's job supervisor sets for a job's driver
    assert main(["config", "--config", str(CONFIGS / "demo.yaml")]) == 2
    assert "relative paths in a submitted Ray job" in capsys.readouterr().err
    shared = ["experiment.output_dir=/mnt/shared/gmpatl"]
    assert main(["config", "--config", str(CONFIGS / "demo.yaml"), "--set", *shared]) == 0
    assert "manifest: /mnt/shared/gmpatl/manifest.csv" in capsys.readouterr().out


def test_a_backbone_sweeps_local_folders_are_made_absolute_and_hub_ids_kept(tmp_path, monkeypatch):
    """Tune runs each trial in a folder of its own and Ray Data's actors elsewhere again: a relative
    checkpoint folder in a backbone sweep must reach them as the folder it names here."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "wavlm-large").mkdir(parents=True)
    space = "sweep={space: {backbone.pretrained: {grid: [models/wavlm-large, microsoft/wavlm-base]}}}"
    config = with_absolute_paths(load_config(CONFIGS / "iemocap.yaml", [space]))
    grid = config.sweep.space["backbone.pretrained"].grid
    assert grid == [str(tmp_path / "models" / "wavlm-large"), "microsoft/wavlm-base"]
