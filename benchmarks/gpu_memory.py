"""GPU memory of the paper's run on one GPU, side by side with the baselines it replaces.

1. Evaluation: a validation split with IEMOCAP's spread of durations (log-normal, median 3.4 s, up to 35 s)
   plus one 120 s recording, scored by a HuBERT-base-size stage-1 model. Baseline: how evaluation ran
   before, whole utterances in batches of the training batch size (64), in manifest order. Bounded: the
   project's passes (``train.eval_batch_s`` 20 to 160, ``train.eval_max_duration_s`` 20), and the 160 s
   passes once more with cuDNN for every positional convolution (see 3). Peak GPU memory and seconds of
   each, and whether they predict the labels of before for the utterances that fit one chunk.
2. Training: one step of stage 1 and of stage 2 (scales 64/512/4096) at the paper's global batch of 64
   crops of 8 s on one GPU, fp32 and bf16 autocast: peak memory and seconds per step, so you know which
   GPUs ``configs/iemocap.yaml`` (one GPU a stage) fits.
3. HuBERT's positional convolution (kernel 128, 16 groups) alone, cuDNN against PyTorch's own kernel, with
   and without gradients, at batch shapes of long and of short utterances: why inference runs it without
   cuDNN (``models/backbone.py``).

Random weights of HuBERT base's size (no download); timings after one warm-up step. Without a CUDA GPU it
says so and exits 0 (``--device cpu --tiny`` runs the same code on a tiny model, as a check of the script).

    .venv/bin/python benchmarks/gpu_memory.py [--utterances 400] [--grid]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmpatl_ray.config import load_config  # noqa: E402
from gmpatl_ray.evaluation import EvalLimits, emotion_scores  # noqa: E402
from gmpatl_ray.models import backbone  # noqa: E402
from gmpatl_ray.models.backbone import load_backbone  # noqa: E402
from gmpatl_ray.stages import stage1, stage2  # noqa: E402
from gmpatl_ray.training import collate  # noqa: E402

GIB = 1 << 30
BASE = ["backbone.pretrained=null", "backbone.random_init={}"]  # BackboneSize's defaults are HuBERT base's
TINY = [
    "backbone.pretrained=null",
    "backbone.random_init={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
    "intermediate_size: 64, conv_dim: 32}",
]
DEVICE = torch.device("cuda")


def split(folder: Path, utterances: int) -> list[dict]:
    rng = np.random.default_rng(0)
    durations = np.clip(rng.lognormal(np.log(3.4), 0.6, utterances), 0.6, 35.0).tolist() + [120.0]
    rows = []
    for i, seconds in enumerate(durations):
        path = folder / f"u{i}.wav"
        sf.write(path, (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32), 16000)
        rows.append({"path": str(path), "emotion": i % 4, "gender": i % 2, "duration_s": seconds})
    return rows


def measure(run) -> tuple[object, float, float]:
    """(result, peak GiB on the GPU, seconds) of ``run()``; no peak (nan) on the CPU."""
    gpu = DEVICE.type == "cuda"
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = run()
    if gpu:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GIB if gpu else float("nan")
    return result, peak, time.perf_counter() - start


def baseline_predictions(model, rows: list[dict], batch_size: int) -> list[int]:
    """Evaluation as it was: whole utterances, ``batch_size`` at a time, in order."""
    from gmpatl_ray.data.audio import load_audio

    predicted = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            items = [(load_audio(r["path"]), {}) for r in rows[start : start + batch_size]]
            batch = collate(items)
            logits = model(batch["waves"].to(DEVICE), batch["lengths"].to(DEVICE))[0]
            predicted += logits.argmax(-1).tolist()
    return predicted


def evaluation(config, rows: list[dict]) -> None:
    model = stage1.build_model(config).to(DEVICE).eval()
    _, weights, _ = measure(lambda: None)
    audio, longest = sum(r["duration_s"] for r in rows), max(r["duration_s"] for r in rows)
    print(f"evaluation: {len(rows)} utterances, {audio:.0f} s of audio, longest {longest:.0f} s")
    print(f"  model weights                    {weights:6.1f} GiB")
    try:
        old, old_peak, old_s = measure(lambda: baseline_predictions(model, rows, 64))
        print(f"  as before (batches of 64)        {old_peak:6.1f} GiB  {old_s:6.1f} s")
    except torch.cuda.OutOfMemoryError:
        old = None
        print("  as before (batches of 64)        out of memory")
    short = [i for i, r in enumerate(rows) if r["duration_s"] <= config.train.eval_max_duration_s]
    saved = backbone.SHORT_FRAMES
    for batch_s in (20, 40, 80, 160):
        train = config.train.model_copy(update={"eval_batch_s": float(batch_s)})
        limits = EvalLimits.of(config.model_copy(update={"train": train}))
        new, peak, seconds = measure(
            lambda bounds=limits: emotion_scores(model, lambda h, n: model.heads(h, n)[0], rows, bounds)
        )
        same = (
            ""
            if old is None
            else f"  same label as before for {sum(old[i] == new['predicted'][i] for i in short)}"
        )
        print(f"  bounded ({batch_s:3d} s passes, 20 s chunks) {peak:6.1f} GiB  {seconds:6.1f} s{same}")
    print(f"  ({len(short)} utterances fit one 20 s chunk)")
    backbone.SHORT_FRAMES = 0  # baseline: cuDNN for the positional convolution of every pass
    _, peak, seconds = measure(lambda: emotion_scores(model, lambda h, n: model.heads(h, n)[0], rows, limits))
    backbone.SHORT_FRAMES = saved
    print(f"  bounded (160 s), cuDNN throughout {peak:6.1f} GiB  {seconds:6.1f} s")


def train_step(model, loss, batch, bf16: bool):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast(DEVICE.type, torch.bfloat16, enabled=bf16):
            value = loss(model, batch)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()

    step()  # warm-up: the optimizer state exists from here on, as in training
    _, peak, seconds = measure(step)
    return peak, seconds


def training(config, folder: Path, batch_size: int) -> None:
    rng = np.random.default_rng(1)
    waves = [(rng.standard_normal(8 * 16000) * 0.1).astype(np.float32) for _ in range(batch_size)]
    batch = collate([(w, {"emotion": i % 4, "gender": i % 2}) for i, w in enumerate(waves)])
    frames = (batch["lengths"] - 400) // 320 + 1
    for k in config.gmp.scales:
        batch[f"k{k}"] = torch.randint(k, (batch_size, int(frames.max())))
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    backbone_dir = folder / "hubert"
    load_backbone(config.backbone).save_pretrained(backbone_dir)
    print(f"training, one step at global batch {batch_size} x 8 s on one device (Adam state included):")
    for precision in ("fp32", "bf16"):
        one = stage1.build_model(config).to(DEVICE).train()
        peak, seconds = train_step(one, lambda m, b: stage1.loss(m, b, config), batch, precision == "bf16")
        print(f"  stage 1 {precision}: {peak:6.1f} GiB  {seconds:5.2f} s/step")
        del one
        two = stage2.build_model(config, {"backbone_dir": str(backbone_dir)}).to(DEVICE).train()
        peak, seconds = train_step(
            two, lambda m, b: stage2.loss(m, b, config, seed=0), batch, precision == "bf16"
        )
        print(f"  stage 2 {precision}: {peak:6.1f} GiB  {seconds:5.2f} s/step  (scales {config.gmp.scales})")
        del two


def positional_conv(config) -> None:
    conv = stage1.build_model(config).to(DEVICE).backbone.encoder.pos_conv_embed
    width = conv.conv.in_channels
    print(f"positional convolution alone (batch x frames of {width}), ms per call and peak GiB:")
    for grad in (False, True):
        for batch, frames in [(8, 999), (64, 399), (64, 124), (128, 60)]:
            hidden = torch.randn(batch, frames, width, device=DEVICE, requires_grad=grad)
            line = []
            for cudnn in (True, False):

                def call(cudnn=cudnn, hidden=hidden, grad=grad):
                    with torch.backends.cudnn.flags(enabled=cudnn), torch.set_grad_enabled(grad):
                        out = conv(hidden)
                        if grad:
                            out.sum().backward()

                call()  # warm-up
                _, peak, seconds = measure(lambda call=call: [call() for _ in range(5)])
                line.append(f"{'cuDNN' if cudnn else 'torch'} {seconds / 5 * 1000:6.1f} ms {peak:5.2f} GiB")
            kind = "forward+backward" if grad else "forward, no grad"
            print(f"  {kind:16s} {batch:3d} x {frames:3d}: " + "   ".join(line))


def positional_conv_grid(config) -> None:
    """Peak GiB of the positional convolution with cuDNN over a grid of batch sizes and frame counts: where
    its workspace blows up with your GPU and cuDNN."""
    conv = stage1.build_model(config).to(DEVICE).backbone.encoder.pos_conv_embed
    frames = (30, 60, 100, 128, 150, 200, 256, 300, 400)
    print(f"positional convolution with cuDNN, peak GiB (rows: gradients, batch; columns: frames {frames})")
    for grad in (False, True):
        for batch in (8, 16, 32, 64, 128, 256):
            peaks = []
            for n in frames:
                hidden = torch.randn(batch, n, conv.conv.in_channels, device=DEVICE, requires_grad=grad)

                def call(hidden=hidden, grad=grad):
                    with torch.backends.cudnn.flags(enabled=True), torch.set_grad_enabled(grad):
                        out = conv(hidden)
                        if grad:
                            out.sum().backward()

                peaks.append(measure(call)[1])
            print(f"  {'grad' if grad else 'no grad':7s} {batch:3d}: " + " ".join(f"{p:5.1f}" for p in peaks))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--utterances", type=int, default=400)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny HuBERT and batch 4 (a check of the script)"
    )
    parser.add_argument("--grid", action="store_true", help="also the positional convolution over a grid")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure")
        return 0
    config = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "iemocap.yaml", TINY if args.tiny else BASE
    )
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, HuBERT {'tiny' if args.tiny else 'base'} size")
    with tempfile.TemporaryDirectory() as tmp:
        evaluation(config, split(Path(tmp), args.utterances))
        training(config, Path(tmp), 4 if args.tiny else 64)
    positional_conv(config)
    if args.grid:
        positional_conv_grid(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
