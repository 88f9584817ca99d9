"""GPU memory of stage 1 at the paper's batch of 64 crops of 8 s on one GPU, for every backbone family, base
and large: what ``configs/backbones.yaml`` needs per GPU.

Without a GPU the figures are computed, not measured: one forward pass of stage 1 at batch 1 on the CPU
(random weights of each model's size, the project's own stage-1 model and forward) with a saved-tensor hook
that adds up every tensor autograd keeps for the backward pass (each storage once, the weights left out;
the GPU's fused attention kernel in place of the CPU's score matrices, see ``SavedForBackward``), scaled by
64; plus the fp32 weights, and the gradients and two Adam moments of the trainable parameters
(the CNN feature encoder is frozen, ``train.freeze_feature_encoder``). bf16 is the same pass under CPU
autocast, plus the bf16 copy of the weights autocast keeps. With gradient checkpointing a transformer layer
keeps only its input (fp32) and recomputes its activations in the backward pass, so the estimate is what
lies outside the layers, plus every layer's input, plus one layer's activations. Transient buffers (a
backward op's workspace, the allocator's cache) come on top: leave headroom. Checked against the one GPU
measurement there is (``benchmarks/gpu_memory.py``, HuBERT base on an H200: 18.0 GiB fp32, 12.6 bf16) it
comes out high, by about a third in fp32 and a seventh in bf16. With a CUDA GPU it also measures one real
training step at batch 64 (peak allocated).

    .venv/bin/python benchmarks/backbone_memory.py [--families hubert,wavlm] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_memory  # noqa: E402

from gmpatl_ray.config import load_config  # noqa: E402
from gmpatl_ray.stages import stage1  # noqa: E402
from gmpatl_ray.training import collate  # noqa: E402

GIB = 1 << 30
LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
FAMILIES = ("hubert", "wavlm", "wav2vec2", "data2vec-audio")
CROP_S = 8.0


def stage1_config(family: str, large: bool, bf16: bool, checkpointing: bool):
    layout = large and family != "data2vec-audio"  # data2vec-audio has one layout for both sizes
    size = {"family": family, **(LARGE if large else {}), "large_layout": layout}
    return load_config(
        Path(__file__).resolve().parents[1] / "configs" / "iemocap.yaml",
        [
            "backbone.pretrained=null",
            f"backbone.random_init={json.dumps(size)}",
            f"train.precision={'bf16' if bf16 else 'fp32'}",
            f"train.gradient_checkpointing={str(checkpointing).lower()}",
        ],
    )


def crop_frames(config) -> int:
    return int((CROP_S * config.data.sample_rate - 400) // 320 + 1)


def crops(batch_size: int, sample_rate: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    waves = [
        (torch.randn(int(CROP_S * sample_rate), generator=generator) * 0.1).numpy() for _ in range(batch_size)
    ]
    return collate([(w, {"emotion": i % 4, "gender": i % 2}) for i, w in enumerate(waves)])


class SavedForBackward:
    """Bytes autograd keeps for the backward pass, inside the transformer layers and outside them.

    A family on PyTorch's scaled-dot-product attention (all but WavLM, whose attention is its own) runs a
    fused kernel on a GPU that keeps its inputs, its output and a log-sum-exp per query, never the
    (frames x frames) score and probability matrices the CPU's math path keeps: those are left out and the
    log-sum-exp counted instead."""

    def __init__(self, model: stage1.Stage1Model, batch: int, frames: int):
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.bytes = {"layers": 0, "rest": 0, "weight_copies": 0}
        self.batch, self.frames = batch, frames
        self.fused = model.backbone.config._attn_implementation == "sdpa"
        self.heads = model.backbone.config.num_attention_heads
        self.depth = {"layer": 0, "attention": 0}
        self.hooks = []
        for layer in model.backbone.encoder.layers:
            for name, module in (("layer", layer), ("attention", layer.attention)):
                self.hooks.append(module.register_forward_pre_hook(lambda *_, n=name: self._enter(n, 1)))
                self.hooks.append(module.register_forward_hook(lambda *_, n=name: self._enter(n, -1)))

    def _enter(self, name: str, step: int) -> None:
        self.depth[name] += step
        if name == "attention" and step == 1 and self.fused:  # the fused kernel's log-sum-exp (fp32)
            self.bytes["layers"] += self.batch * self.heads * self.frames * 4

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.fused and self.depth["attention"] and tensor.shape[-2:] == (self.frames, self.frames):
            return tensor  # a score or probability matrix: not kept by the fused kernel
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.weights and key not in self.seen:
            self.seen.add(key)
            where = "layers" if self.depth["layer"] else "rest"
            self.bytes["weight_copies" if _weight_copy(tensor) else where] += storage.nbytes()
        return tensor


def _weight_copy(tensor: torch.Tensor) -> bool:
    """Autocast's bf16 copy of a weight (or a view of one, as a linear layer keeps it): kept once,
    whatever the batch."""
    node = tensor.grad_fn
    while node is not None and type(node).__name__ in VIEWS and len(node.next_functions) == 1:
        node = node.next_functions[0][0]
    if node is None or type(node).__name__ != "ToCopyBackward0":
        return False
    return type(node.next_functions[0][0]).__name__ == "AccumulateGrad"


VIEWS = {"TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "ExpandBackward0"}


def saved_bytes(model, config, batch_size: int, bf16: bool) -> dict[str, int]:
    counter = SavedForBackward(model, batch_size, crop_frames(config))
    hooks = torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t)
    with hooks, torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        stage1.loss(model, crops(batch_size, config.data.sample_rate), config)
    counter.remove()
    return counter.bytes


def computed(family: str, large: bool, batch_size: int) -> dict[str, float]:
    """GiB at ``batch_size``: fp32, bf16, bf16 with gradient checkpointing (see the module docstring),
    from one crop's pass (what is saved grows with the batch, but for autocast's copies of the weights)."""
    config = stage1_config(family, large, bf16=False, checkpointing=False)
    model = stage1.build_model(config).train()
    weights = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    states = 4 * weights + 12 * trainable  # fp32 weights; gradients and two Adam moments
    size = config.backbone.random_init
    totals = {}
    for bf16 in (False, True):
        crop = saved_bytes(model, config, 1, bf16)
        totals[bf16] = states + crop["weight_copies"] + batch_size * (crop["layers"] + crop["rest"])
    layer_input = crop_frames(config) * size.hidden_size * 4  # the fp32 residual stream a layer keeps
    checkpointed = crop["rest"] + size.num_hidden_layers * layer_input
    checkpointed += crop["layers"] / size.num_hidden_layers  # one layer recomputed at a time
    return {
        "weights_m": weights / 1e6,
        "trainable_m": trainable / 1e6,
        "fp32": totals[False] / GIB,
        "bf16": totals[True] / GIB,
        "bf16_checkpointing": (states + crop["weight_copies"] + batch_size * checkpointed) / GIB,
    }


def measured(family: str, large: bool, batch_size: int, bf16: bool, checkpointing: bool) -> float:
    config = stage1_config(family, large, bf16, checkpointing)
    model = stage1.build_model(config).to(gpu_memory.DEVICE).train()
    batch = {k: v.to(gpu_memory.DEVICE) for k, v in crops(batch_size, config.data.sample_rate).items()}
    try:
        peak, _ = gpu_memory.train_step(model, lambda m, b: stage1.loss(m, b, config), batch, bf16)
    except torch.cuda.OutOfMemoryError:
        peak = float("inf")
    del model
    torch.cuda.empty_cache()
    return peak


def row(family: str, large: bool, batch_size: int) -> str:
    """One model's table row, computed (and on a GPU measured) in this process."""
    figures = computed(family, large, batch_size)
    cells = [
        family,
        "large" if large else "base",
        f"{figures['weights_m']:.0f}",
        f"{figures['trainable_m']:.0f}",
        *(f"{figures[k]:.1f}" for k in ("fp32", "bf16", "bf16_checkpointing")),
    ]
    if torch.cuda.is_available():
        cells += [f"{measured(family, large, batch_size, b, b):.1f}" for b in (False, True)]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--one", metavar="FAMILY:SIZE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child: the CPU allocator does not give a model's memory back for the next one
        family, size = args.one.split(":")
        print(row(family, size == "large", args.batch), flush=True)
        return 0
    gpu = torch.cuda.is_available()
    where = "computed on the CPU" + (f" and measured on {torch.cuda.get_device_name()}" if gpu else "")
    print(f"stage 1, one GPU, batch {args.batch} x {CROP_S:.0f} s crops, Adam; GiB {where}")
    header = "| family | size | weights (M) | trainable (M) | fp32 | bf16 | bf16 + checkpointing |"
    print(header + (" measured fp32 | measured bf16 + checkpointing |" if gpu else ""))
    print("|" + " --- |" * (header.count("|") - 1 + (2 if gpu else 0)), flush=True)
    for family in args.families.split(","):
        for size in ("base", "large"):
            one = [sys.executable, __file__, "--one", f"{family}:{size}", "--batch", str(args.batch)]
            child = subprocess.run(one, capture_output=True, text=True)
            if child.returncode:
                print(child.stderr[-3000:], file=sys.stderr)
                return child.returncode
            print(child.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
