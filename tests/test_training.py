"""What the shared training loop promises, checked on weights and numbers: the model a stage keeps is its
best epoch's (not the last's), stage 2's loss is a mean over every DDP worker's frames, and training reads
audio as ``data`` says."""

from __future__ import annotations

import inspect
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.multiprocessing as mp
from conftest import TINY_TRAINING, small_config
from processes import free_port

from gmpatl_ray.cv import fold_split
from gmpatl_ray.data.audio import AudioError
from gmpatl_ray.models.backbone import frame_counts, load_backbone
from gmpatl_ray.models.masking import span_mask
from gmpatl_ray.stages import stage1, stage2, stage3
from gmpatl_ray.training import (
    CollectiveDeviceError,
    StorageNotShared,
    all_reduce_sum,
    data_loader,
    emotion_dataset,
    emotion_rows,
    epoch_sums,
    global_mean,
    load_model,
    load_state,
    run_name,
    save_model,
    saved_weights,
    visible_build_folder,
)

PACKAGE = Path(__file__).parent.parent / "gmpatl_ray"


def last_checkpoint(storage: Path, kind: str, key: str) -> dict:
    """The state of the last epoch's checkpoint of a stage run whose run folder was kept."""
    (checkpoint,) = (c for c in (storage / run_name(kind, key)).glob("checkpoint_*") if c.is_dir())
    return load_state(checkpoint, run_name(kind, key))


@pytest.mark.slow
def test_every_stage_keeps_its_best_epochs_weights(small_corpus, trained_fold, tmp_path):
    """The session's trained fold, its run folders kept. For every stage: the saved model, validated
    again, scores exactly its recorded best epoch's score, and its weights are that epoch's copy, which
    differ from the last epoch's whenever the best epoch was an earlier one (as it is for one stage at
    least in this run: otherwise the test proves nothing and says so)."""
    folder, manifest = small_corpus
    cache, fold = trained_fold
    config = small_config(folder, *TINY_TRAINING)
    split = fold_split(config, manifest, 1)
    emotions = config.data.emotions
    artifacts = fold.artifacts
    stage1_backbone = str(artifacts["stage1"].path / "backbone")
    loops = {
        "stage1": (stage1, {"val": emotion_rows(split.val, emotions)}),
        "stage2": (
            stage2,
            {
                "backbone_dir": stage1_backbone,
                "gmp_dir": str(artifacts["gmps"].path),
                "val": stage2.frame_rows(split.val),
            },
        ),
        "stage3": (
            stage3,
            {
                "backbone_dir": str(artifacts["stage2"].path / "backbone"),
                "val": emotion_rows(split.val, emotions),
            },
        ),
    }
    earlier_best = []
    for kind, (recipe, loop) in loops.items():
        artifact = artifacts[kind]
        history, best_epoch = artifact.meta["history"], artifact.meta["best_epoch"]
        scores = [h["val_score"] for h in history]
        assert best_epoch == scores.index(max(scores)), (kind, scores)  # the first of the best
        model = load_model(recipe.build_model(config, loop), artifact.path)
        again = recipe.evaluate(model, loop, config)["score"]
        if kind == "stage2":  # a loss: the same up to summation order
            assert again == pytest.approx(scores[best_epoch], rel=1e-5), kind
        else:  # a UAR, exactly
            assert again == scores[best_epoch] == artifact.meta["best_val_uar"], kind

        kept = saved_weights(artifact.path)
        state = last_checkpoint(cache.parent / "ray", kind, artifact.path.name)
        assert state["epoch"] == len(history) - 1
        assert kept.keys() == state["best"]["model"].keys() == state["model"].keys()
        assert all(torch.equal(kept[k], state["best"]["model"][k]) for k in kept), kind
        if best_epoch < state["epoch"]:
            earlier_best.append(kind)
            changed = [k for k in kept if not torch.equal(kept[k], state["model"][k])]
            assert changed, f"{kind}: the kept model is the last epoch's, not epoch {best_epoch}'s"
    assert earlier_best, "no stage's best epoch came before its last here: pick a run where one does"


def stage2_gradients(rank: int, world: int, port: int, backbone_dir: str, out: str) -> None:
    """One DDP worker (gloo): its own batch, fixed masks; rank 0 saves the averaged gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        config, batch = stage2_case(Path(backbone_dir).parent, rank)
        model = DistributedDataParallel(stage2.build_model(config, {"backbone_dir": backbone_dir}).eval())
        stage2.loss(model, batch, config, seed=rank).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}, out)
    finally:
        dist.destroy_process_group()


def stage2_case(folder: Path, rank: int) -> tuple:
    """Rank ``rank``'s batch: rank 0 has one 0.5 s utterance, rank 1 three of 1-2 s, so their masked
    frame counts differ several times over."""
    config = small_config(folder, "stage2.proj_dim=16", "gmp.scales=[4, 8]")
    lengths = torch.tensor([8000]) if rank == 0 else torch.tensor([32000, 24000, 16000])
    generator = torch.Generator().manual_seed(rank)
    batch = {"waves": torch.randn(len(lengths), int(lengths.max()), generator=generator), "lengths": lengths}
    frames = (lengths - 400) // 320 + 1
    for k in config.gmp.scales:
        labels = torch.randint(k, (len(lengths), int(frames.max())), generator=generator)
        labels[torch.arange(labels.shape[1])[None, :] >= frames[:, None]] = -100
        batch[f"k{k}"] = labels
    return config, batch


def test_stage2_loss_is_the_mean_over_every_workers_frames(tmp_path):
    """Two gloo workers with very different numbers of masked frames: DDP's averaged gradients equal the
    gradients of one process's loss over all frames of both batches (each scale's summed cross-entropy
    over the total frame count), and not those of the mean of the two workers' own means."""
    config, _ = stage2_case(tmp_path, 0)
    backbone_dir = tmp_path / "hubert"
    load_backbone(config.backbone, config.experiment.seed).save_pretrained(backbone_dir)
    out = tmp_path / "ddp.pt"
    mp.spawn(stage2_gradients, args=(2, free_port(), str(backbone_dir), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)

    def gradients(combine) -> dict[str, torch.Tensor]:
        model = stage2.build_model(config, {"backbone_dir": str(backbone_dir)}).eval()
        terms = []
        for rank in (0, 1):  # the masks stage2.loss draws on that rank
            batch = stage2_case(tmp_path, rank)[1]
            frames = frame_counts(model.backbone, batch["lengths"])
            mask = span_mask(
                frames, int(frames.max()), config.stage2.mask_prob, config.stage2.mask_length, rank
            )
            terms.append(stage2.loss_terms(model, batch, config, mask))
        combine(terms).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    def over_all_frames(terms):
        return sum(w * (s0 + s1) / (n0 + n1) for (w, s0, n0), (_, s1, n1) in zip(*terms, strict=True))

    def mean_of_means(terms):
        return sum(w * (s0 / n0 + s1 / n1) / 2 for (w, s0, n0), (_, s1, n1) in zip(*terms, strict=True))

    expected, naive = gradients(over_all_frames), gradients(mean_of_means)
    assert ddp.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(ddp[name], expected[name], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(naive[n], expected[n], rtol=1e-2, atol=1e-5) for n in expected)


def test_training_reads_audio_as_the_data_section_says(small_corpus, tmp_path):
    """An 8 kHz file: resampled to 16 kHz by default, refused with ``data.resample: false`` (it used to be
    resampled whatever the config said)."""
    folder, _ = small_corpus
    path = tmp_path / "8k.wav"
    sf.write(path, np.sin(np.arange(8000) / 5).astype(np.float32) * 0.5, 8000)
    rows = [{"path": str(path), "emotion": 0, "gender": 0, "duration_s": 1.0}]
    resampled = emotion_dataset(small_config(folder), {}, rows, train=False)[0][0]
    assert len(resampled) == 16000
    strict = small_config(folder, "data.resample=false")
    with pytest.raises(AudioError, match=rf"{path}: sample rate 8000 Hz, expected 16000 Hz"):
        emotion_dataset(strict, {}, rows, train=True)[0]


def test_a_saved_model_loads_back_exactly(tmp_path):
    config = small_config(tmp_path, "stage1.lstm_hidden=8", "stage1.proj_dim=8")
    model = stage1.build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    save_model(model, tmp_path / "model")
    again = load_model(stage1.build_model(config), tmp_path / "model")
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


META = torch.device("meta")
"""A model device that is not the CPU, as a GPU worker's is: on a CPU-only machine the only way to see
that a collective's tensor follows the model and not the CPU default."""


def test_a_collective_refuses_a_tensor_that_is_not_on_the_models_device():
    with pytest.raises(CollectiveDeviceError, match="a collective's tensor is on cpu, the model on meta"):
        all_reduce_sum(torch.zeros(2), META)
    assert all_reduce_sum(torch.zeros(2, device=META), META).device == META
    assert all_reduce_sum(torch.ones(2), torch.device("cpu")).tolist() == [1.0, 1.0]


def test_the_training_loops_collectives_follow_the_models_device():
    """The epoch's loss sums and stage 2's frame counts are reduced on the device of the model: with the
    tensors made on the CPU (as before the fix) these raise, as NCCL would on GPU workers."""
    assert epoch_sums(3.0, 2, META).device == META
    loss_on_the_device = torch.ones((), device=META)
    assert global_mean(loss_on_the_device, torch.tensor(5)).device == META  # frame counts come as CPU ints
    assert global_mean(torch.tensor(6.0), torch.tensor(4)).item() == 1.5


def test_every_collective_of_the_package_goes_through_the_device_check():
    """A collective called anywhere but :func:`all_reduce_sum` would skip the check."""
    collective = re.compile(
        r"(?:dist|distributed)\.(all_reduce|all_gather\w*|broadcast\w*|reduce_scatter\w*|all_to_all\w*|"
        r"barrier|gather\w*|scatter\w*|reduce)\("
    )
    calls = {
        f"{path.relative_to(PACKAGE.parent)}:{n}"
        for path in PACKAGE.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if collective.search(line)
    }
    source = inspect.getsource(all_reduce_sum)
    assert len(calls) == 1 and "dist.all_reduce(tensor)" in source, calls


def test_loader_processes_give_the_same_batches_as_the_training_process(small_corpus):
    """``train.loader_workers`` only moves the reading: the same crops, in the same order, every epoch."""
    folder, manifest = small_corpus
    config = small_config(folder, "train.max_duration_s=0.5")
    rows = emotion_rows(manifest.head(10), config.data.emotions)

    def epochs(workers: int) -> list[list[dict]]:
        train = config.train.model_copy(update={"loader_workers": workers})
        dataset = emotion_dataset(config, {}, rows, train=True)
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, seed=3)
        loader = data_loader(dataset, sampler, 4, train, torch.device("cpu"))
        seen = []
        for epoch in (0, 1):
            dataset.epoch = epoch
            sampler.set_epoch(epoch)
            seen.append(list(loader))
        return seen

    inline, forked = epochs(0), epochs(2)
    assert [len(e) for e in forked] == [3, 3]
    for a_epoch, b_epoch in zip(inline, forked, strict=True):
        for a, b in zip(a_epoch, b_epoch, strict=True):
            assert torch.equal(a["waves"], b["waves"]) and torch.equal(a["emotion"], b["emotion"])
    assert not torch.equal(inline[0][0]["waves"], inline[1][0]["waves"])  # crops and order change by epoch


def test_a_worker_that_cannot_see_the_caches_build_folder_fails_at_once_naming_its_node(tmp_path):
    """What a worker on another node meets when experiment.cache_dir is on one node's own disk."""
    assert visible_build_folder(str(tmp_path)) == tmp_path
    missing = tmp_path / "cache" / "stage1" / ".abc.tmp-1234"
    with pytest.raises(StorageNotShared, match=rf"{missing}: .* not visible on node {socket.gethostname()}"):
        visible_build_folder(str(missing))
