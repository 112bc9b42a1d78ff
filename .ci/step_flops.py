"""FLOPs of one training step of each trainer, counted with torch.utils.flop_counter's formulas
(matrix products and convolutions, forward and backward), on random inputs of the benchmarks'
shapes.
A step's FLOPs do not depend on the device, so this runs anywhere; .ci/gpu divides them by the
measured step time.

    python .ci/step_flops.py [--device cuda] [--mnist_batch 64] [--stargan_batch 64]

Prints one line per trainer: GFLOP a plain step, on an R1 step, and averaged over the schedule.
"""

import argparse
import os
import sys
import tempfile
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_latent_stargan as sg  # noqa: E402
import train_mnist_gan as mg  # noqa: E402


class FlopCount(TorchDispatchMode):
    """FlopCounterMode's formulas without its module tracking, whose hooks refuse the double
    backward of R1 (autograd.grad inside a counted region)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def counted(fn):
    with FlopCount() as fc:
        fn()
    return fc.total


def stargan(device, B, shape=(4, 32, 32), K=3):
    with tempfile.TemporaryDirectory() as tmp:  # parse_config reads only the flags
        cfg, _ = sg.parse_config(["--data", "x.pt", "--out_dir", tmp, "--device", str(device)])
    cfg["compile"] = False
    m = sg.build_models(cfg, shape, K, device)
    nets = (m["G"], m["E"], m["F"], m["D"])
    y_src = torch.randint(K, (B,), device=device)
    y_trg = (y_src + 1) % K
    lat = torch.randn(2, B, *shape, device=device)
    z = torch.randn(2, B, cfg["latent_dim"], device=device)
    views = sg.random_views(2 * B, cfg["e_flip"], cfg["e_shift"], cfg["e_zoom"], shape[1:], device)
    batch = (lat[0], y_src, y_trg, lat[1], z[0], z[1], views, None, None, None)  # ADA, f_match off
    plain = counted(lambda: sg.train_step(cfg, nets, m, batch, 1, 1.0, nullcontext()))
    r1 = counted(lambda: sg.train_step(cfg, nets, m, batch, 0, 1.0, nullcontext()))
    return plain, r1, cfg["r1_interval"]


def mnist(device, B):
    with tempfile.TemporaryDirectory() as tmp:
        cfg, _ = mg.parse_config(["--out_dir", tmp, "--device", str(device)])
    m = mg.build_models(cfg, device)
    real = torch.rand(B, 784, device=device) * 2 - 1
    z = torch.randn(B, cfg["latent_dim"], device=device)
    step = lambda: mg.train_step(cfg, m, m["G"], m["D"], real, z, 0, 1, nullcontext())  # noqa: E731
    return counted(step)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--mnist_batch", type=int, default=64, help="seed 004's 64")
    p.add_argument("--stargan_batch", type=int, default=64, help="seed 001's project's 64")
    args = p.parse_args()
    device, B = torch.device(args.device), args.stargan_batch
    flops = mnist(device, args.mnist_batch)
    print(
        f"train_mnist_gan.py, batch {args.mnist_batch}: {flops / 1e9:.3f} GFLOP a step (seed 004's "
        "bce)"
    )
    plain, r1, every = stargan(device, B)
    mean = plain + (r1 - plain) / every
    print(
        f"train_latent_stargan.py, default model, batch {B}, 4x32x32 latents, 3 domains: "
        f"{plain / 1e9:.1f} GFLOP a step, {r1 / 1e9:.1f} on an R1 step, {mean / 1e9:.1f} on "
        f"average (R1 every {every} steps)"
    )
