"""
Seed 001's StarGAN v2 in Stable Diffusion VAE latent space: every loss and log as the seed has them.

    python encode_latents.py --images data/afhq/train --out data/latents.pt  # images -> latents
    python train_latent_stargan.py --data data/latents.pt --ds_decay_epochs 20
    python train_latent_stargan.py --resume --out_dir out/latent_stargan    # continue exactly
    python plot_losses.py out/latent_stargan/log.json                       # the curves, explained
    torchrun --standalone --nproc_per_node 8 train_latent_stargan.py --data data/latents.pt # 8 GPUs
    python train_latent_stargan.py --translate my_photos --out_dir out/latent_stargan --target dog

A smoke test on Fashion-MNIST's IDX files in data/fashion (train_mnist_gan.py --dataset fashion
downloads them there) and a random tiny VAE, which the tests can write:
    python posed_fashion.py tiny-vae data/tiny_vae                           # seconds
    python encode_latents.py --source idx --images data/fashion --classes 5,7,9 --size 32 \\
        --max_per_domain 64 --vae data/tiny_vae --out data/tiny.pt            # seconds
    python train_latent_stargan.py --data data/tiny.pt --epochs 2 --epoch_size 64 \\
        --batch_size 8 --g_dim 32 --e_dim 16 --d_dim 16 --f_dim 64 --eval_interval 0  # seconds

One step (seed 001). content, x_ref = latents * latent_scale; y_trg uniform, never y_src.
  ref path: s_ref = E(x_ref, y_trg)    latent path: s_lat = F(z_trg, y_trg)
  D:  d_loss = 0.5 * (d_hinge(D(x_ref), D(G(content, s_ref).detach()))
                      + d_hinge(D(x_ref), D(G(content, s_lat).detach())))
      + (w_r1 * r1_interval) * r1 on steps where step % r1_interval == 0 (float32, autocast off)
  G:  g_loss = w_adv*g_adv + w_sty*sty + w_cyc*cyc + w_id*id - lambda_ds(epoch)*ds
      g_adv = -mean D(fake_ref) - mean D(fake_lat)
      sty = L1(E(fake_ref), s_ref) + L1(E(fake_lat), s_lat)
      ds = L1(G(content, F(z_1)), G(content, F(z_2))), clamped at ds_margin
      cyc = L1(G(fake_ref, s_src), content) + L1(G(fake_lat, s_src), content), s_src = E(content)
      id = L1(G(content, s_src), content) when w_id > 0, else logged as 0; with
      --id_decay_epochs N, w_id falls as lambda_ds does over N epochs (default 0: constant)
      --w_struct, --w_stats and --w_f_match add terms of our own (default 0): docs/latent_stargan.md
  lambda_ds(epoch) = w_ds * (1 - clamp((epoch - 1) / ds_decay_epochs, 0, 1)): w_ds at epoch 1,
      0 from epoch ds_decay_epochs + 1.
Every loss is computed on the scaled latents. G, E and F are updated together; D separately.
--adv_loss nsgan (StarGAN v2's BCE) or rpgan (R3GAN's relativistic pairing, each fake against the
real x_ref of its row) replace d_hinge and g_adv; --w_r2 adds R2, R1 on the fakes, on R1's steps.

Output in --out_dir: log.json (per-epoch means of LOG_KEYS, with lambda_ds, imgs_per_sec and
time, and the evaluation figures), samples/epochNNN.png (reference- and latent-guided
translations, decoded through the VAE when it loads), ckpt.pt (everything --resume needs, on any
number of processes). --profile N adds profile.txt and profile.json: where N steps' time went.
"""

import argparse
import copy
import hashlib
import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

SCRIPT = "train_latent_stargan.py"
WARMUP_STEPS = 10  # steps left out of the final throughput (torch.compile compiles in the first)
LOG_KEYS = "d_loss g_loss g_adv sty ds cyc id struct stats f_match r1 r2 d_real d_fake ada_rt"
LOG_KEYS = LOG_KEYS.split()
F_MATCH_N = 64  # f_match's draws: this many styles by F and by E of every domain, each step
ADV_LOSSES = ("hinge", "nsgan", "rpgan")
PRDC = ("precision", "recall", "density", "coverage")
ARCH = ("style_dim", "latent_dim", "g_dim", "g_blocks", "g_down", "e_dim", "d_dim", "f_dim")
# a resumed run cannot change these: the networks, the epoch bookkeeping, the held-out split
FIXED = ARCH + ("f_shared", "batch_size", "epoch_size", "val_fraction", "adv_loss")
# this machine's and this call's, not the checkpoint's
SYSTEM = ("device", "dtype", "compile", "profile", "world_size")
TRANSLATE = ("translate", "ref", "target", "n_styles", "result_dir", "vae", "resume")

# -----------------------------------------------------------------------------
# flags: seed 001's config names, grouped, each with where its default comes from


def build_parser():
    p = ArgParser(
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # fmt: off
    # data
    p.add_argument("--data", default="data/latents.pt", help="latents .pt of encode_latents.py")
    p.add_argument("--latent_scale", type=positive_float, default=0.18215,
                   help="the latents are multiplied by this (seed 001: 0.18215, SD 1.x)")
    p.add_argument("--val_fraction", type=unit_float, default=0.05,
                   help="share of each domain held out for samples and evaluation (default 0.05)")
    # model (seed 001's project: StarGAN v2's design, sized for 4x32x32 latents)
    p.add_argument("--style_dim", type=positive_int, default=64, help="style code size")
    p.add_argument("--latent_dim", type=positive_int, default=16, help="size of F's z")
    p.add_argument("--g_dim", type=positive_int, default=256, help="generator width")
    p.add_argument("--g_blocks", type=positive_int, default=6,
                   help="generator residual blocks, half IN-encoder, half AdaIN-decoder (even)")
    p.add_argument("--g_down", type=nonneg_int, default=None,
                   help="times G halves the latent size inside (default: 1, as StarGAN v2 "
                        "at 256 px; 0 where a halving would leave less than 8x8)")
    p.add_argument("--e_dim", type=positive_int, default=128, help="style encoder base width")
    p.add_argument("--d_dim", type=positive_int, default=128, help="discriminator base width")
    p.add_argument("--f_dim", type=positive_int, default=512, help="mapping network width")
    p.add_argument("--f_shared", type=positive_int, default=3, help="mapping network shared layers")
    # E's views: styles from moved latents carry no pose; G takes it from its source (docs/pose.md)
    p.add_argument("--e_flip", type=unit_float, default=0.5,
                   help="chance that E sees a style's latent mirrored left-right (0: never)")
    p.add_argument("--e_shift", type=unit_float, default=0.25,
                   help="... shifted by up to this share of its size, in whole pixels (0: not)")
    p.add_argument("--e_zoom", type=unit_float, default=0.25,
                   help="... zoomed by a factor in [1 - e_zoom, 1 + e_zoom] (0: not; off with "
                        "--e_views)")
    p.add_argument("--e_views", type=unit_float, default=0.0,
                   help="chance that E sees, instead of a latent, one of its image's zoomed "
                        "encodings (encode_latents.py --zoom_views), where the latent zoom does "
                        "not hide a garment's size; 0.85 with --stats_e --stats_max, which carry "
                        "the size from the latents E sees (docs/style.md; 0: not)")
    # loss (seed 001's loss.* keys)
    p.add_argument("--w_adv", type=nonneg_float, default=1.0, help="weight of g_adv")
    p.add_argument("--w_sty", type=nonneg_float, default=1.0, help="weight of sty, style recon.")
    p.add_argument("--w_ds", type=nonneg_float, default=1.0,
                   help="initial weight of ds, diversity, subtracted from g_loss")
    p.add_argument("--ds_decay_epochs", type=nonneg_int, default=20,
                   help="lambda_ds falls linearly from w_ds to 0 in this many epochs (0: no decay)")
    p.add_argument("--ds_margin", type=nonneg_float, default=1.5,
                   help="ds is clamped at this L1 distance (0: no clamp)")
    p.add_argument("--w_cyc", type=nonneg_float, default=1.0,
                   help="weight of cyc, cycle consistency (raise it if content breaks)")
    p.add_argument("--w_id", type=nonneg_float, default=1.0,
                   help="weight of id, identity (0 skips the term and logs it as 0)")
    p.add_argument("--id_decay_epochs", type=nonneg_int, default=0,
                   help="w_id falls to 0 over this many epochs, as lambda_ds does (0: constant)")
    p.add_argument("--w_struct", type=nonneg_float, default=0.0,
                   help="weight of struct: a translation's layout against its source's (0: off)")
    p.add_argument("--w_stats", type=nonneg_float, default=0.0,
                   help="weight of stats, the reference's style statistics in its translation "
                        "(docs/style.md; 0: seed 001's losses exactly)")
    p.add_argument("--stats_e", action="store_true",
                   help="stats trains E too: the reference's look reaches further, but E then "
                        "carries what T sees, a garment's size too, to the output (docs/style.md)")
    p.add_argument("--stats_max", action="store_true",
                   help="stats' T holds each channel's largest and smallest value too, into G "
                        "only: a dimmed garment's brightest pixel, which the moments blur; with "
                        "--stats_e it can carry a garment's size unless --e_views is 0.85 or more "
                        "at --lr 3e-4 (at 5e-4 it did on one seed of three; docs/style.md)")
    p.add_argument("--w_f_match", type=nonneg_float, default=0.0,
                   help="weight of f_match, F's styles onto E's of the same domain, so that z "
                        "reaches the data's styles (docs/style.md; needs F to move: --f_lr 1e-3)")
    p.add_argument("--adv_loss", choices=ADV_LOSSES, default="hinge",
                   help="hinge (seed 001), nsgan (StarGAN v2's BCE) or rpgan (R3GAN's, each fake "
                        "paired with the real reference of its row)")
    p.add_argument("--w_r1", type=nonneg_float, default=2.0, help="weight of the R1 penalty")
    p.add_argument("--w_r2", type=nonneg_float, default=0.0,
                   help="weight of R2, R1 on the fakes, on R1's steps and compensated (R3GAN)")
    p.add_argument("--r1_interval", type=positive_int, default=16,
                   help="R1 every this many steps, its weight multiplied by it")
    # ADA (StyleGAN2-ADA) in latent space: every latent D sees through one augmentation pipe
    p.add_argument("--ada_target", type=sign_mean, default=None,
                   help="adaptive augmentation: p rises while r_t = E[sign(D(x_ref))] is above "
                        "this (StyleGAN2-ADA: 0.6), falls below it (default: off)")
    p.add_argument("--ada_p", type=probability, default=None,
                   help="a fixed augmentation probability instead (DiffAugment-style)")
    p.add_argument("--ada_interval", type=positive_int, default=4, help="steps between p's moves")
    p.add_argument("--ada_kimg", type=positive_float, default=500,
                   help="thousands of latents for p to move from 0 to 1 (short runs: 20)")
    p.add_argument("--ada_p_max", type=probability, default=0.4,
                   help="adaptive p's ceiling: above it the pipe leaks into G (docs/ada.md)")
    # schedule and optimizers
    p.add_argument("--epochs", type=positive_int, default=100, help="epochs")
    p.add_argument("--epoch_size", type=positive_int, default=6144,
                   help="SAMPLES per epoch; steps per epoch = epoch_size // batch_size")
    p.add_argument("--batch_size", type=positive_int, default=64, help="latents per step")
    p.add_argument("--max_iters", type=nonneg_int, default=0,
                   help="stop after this many steps in all (0: no limit)")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate of G, E, D")
    p.add_argument("--f_lr", type=positive_float, default=1e-6,
                   help="Adam learning rate of the mapping network F")
    p.add_argument("--betas", type=unit_float, nargs=2, default=[0.0, 0.99], help="Adam betas")
    p.add_argument("--weight_decay", type=nonneg_float, default=1e-4, help="Adam weight decay")
    p.add_argument("--ema", type=unit_float, default=0.999,
                   help="EMA beta of G, E, F for samples and eval (StarGAN v2: 0.999; 0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    # I/O
    p.add_argument("--out_dir", default="out/latent_stargan", help="log.json, samples/, ckpt.pt")
    p.add_argument("--resume", action="store_true",
                   help="continue out_dir/ckpt.pt; the flags not typed take the checkpoint's")
    p.add_argument("--log_interval", type=positive_int, default=50,
                   help="a progress line every this many steps")
    p.add_argument("--n_samples", type=positive_int, default=4, help="sources in the sample grids")
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                   help="decode sample grids through the VAE the latents file names")
    # evaluation (on the held-out latents, with the EMA networks)
    p.add_argument("--eval_interval", type=nonneg_int, default=5,
                   help="evaluate every this many epochs and at the end (0: never)")
    p.add_argument("--n_div", type=at_least_2, default=4, help="styles per source for div")
    p.add_argument("--min_clf_acc", type=float, default=0.8,
                   help="warn when the domain classifier's held-out accuracy is below this")
    # translate your own images with a trained run (--out_dir RUN): StarGAN v2's --mode sample
    p.add_argument("--translate", default=None, metavar="SRC_DIR",
                   help="translate the images under SRC_DIR with RUN's EMA networks, not train")
    p.add_argument("--ref", default=None, metavar="REF_DIR",
                   help="--translate by reference: one sub-folder per domain, named as in training")
    p.add_argument("--target", default=None, metavar="DOMAIN",
                   help="--translate into DOMAIN with --n_styles styles from F (fixed z, --seed)")
    p.add_argument("--n_styles", type=positive_int, default=4, help="--target: styles per source")
    p.add_argument("--result_dir", default=None,
                   help="--translate: where the PNGs go (default RUN/translations)")
    p.add_argument("--vae", default=None,
                   help="--translate: the VAE to encode and decode with (default: the run's)")
    # system
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, cuda:1, cpu, ...")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="autocast dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile G, E, F and D (default: on for CUDA, off for CPU)")
    p.add_argument("--profile", type=nonneg_int, default=0, metavar="N",
                   help="profile N steps after the warm-up: out_dir/profile.txt and profile.json")
    # fmt: on
    return p


def parse_config(argv=None):
    """The run's config, every flag's value (the log records it), and the checkpoint to resume."""
    cfg, typed = parse_flags(build_parser(), argv)
    if cfg["translate"] and (cfg["ref"] is None) == (cfg["target"] is None):
        die("--translate takes either --ref REF_DIR (one sub-folder per domain) or --target DOMAIN")
    ckpt = None
    if cfg["resume"] or cfg["translate"]:  # the flags not typed take the checkpoint's values
        ckpt = load_checkpoint(cfg["out_dir"], "--translate" if cfg["translate"] else "--resume")
        kept = {k: v for k, v in ckpt["config"].items() if k not in SYSTEM + TRANSLATE}
        cfg = {**cfg, **kept, **{k: cfg[k] for k in typed}}
        if cfg["resume"] and not cfg["translate"]:
            check_resume(cfg, ckpt, FIXED, SYSTEM)
    if cfg["g_blocks"] % 2:
        die(f"--g_blocks must be even (half encoder, half decoder), got {cfg['g_blocks']}")
    if cfg["ada_target"] is not None and cfg["ada_p"] is not None:
        die("--ada_target adapts p and --ada_p fixes it: give one of them")
    if (cfg["stats_e"] or cfg["stats_max"]) and cfg["w_stats"] <= 0:
        die("--stats_e and --stats_max shape stats, which is off: give it a weight (--w_stats 20)")
    B = cfg["batch_size"]
    if cfg["epoch_size"] < B:
        die(f"--epoch_size counts samples: {cfg['epoch_size']} is less than one batch of {B}")
    if cfg["eval_interval"] and cfg["val_fraction"] <= 0:
        die("evaluation needs held-out latents: give --val_fraction > 0, or --eval_interval 0")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes, all of them
    if B % world:
        die(f"--batch_size {B} is the global batch and {world} processes cannot "
            f"share it evenly; give a multiple of {world}")  # fmt: skip
    return cfg | system_config(cfg) | {"world_size": world}, ckpt


# -----------------------------------------------------------------------------
# argparse with one-line errors; the types that check a flag's range; resuming a run's flags


class ArgParser(argparse.ArgumentParser):
    """argparse, with the project's one-line error for a mistyped flag instead of a usage dump."""

    def error(self, message):
        die(message)


def die(msg, every_rank=False):
    """A user mistake: one line on stderr and exit status 2, no traceback. Under torchrun every
    rank finds the same mistake and rank 0 says it, unless it is one rank's own (every_rank)."""
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(f"{SCRIPT}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def check(text, kind, ok, what):
    """An argparse type's work: text -> kind, refused in one line unless ok(value)."""
    value = kind(text)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text):
    return check(text, int, lambda v: v >= 1, "at least 1")


def at_least_2(text):
    return check(text, int, lambda v: v >= 2, "at least 2")


def nonneg_int(text):
    return check(text, int, lambda v: v >= 0, "zero or positive")


def positive_float(text):
    return check(text, float, lambda v: v > 0, "positive")


def nonneg_float(text):
    return check(text, float, lambda v: v >= 0, "zero or positive")


def unit_float(text):
    return check(text, float, lambda v: 0 <= v < 1, "in [0, 1)")


def probability(text):
    return check(text, float, lambda v: 0 <= v <= 1, "in [0, 1]")


def sign_mean(text):
    return check(text, float, lambda v: -1 <= v <= 1, "in [-1, 1]")


def parse_flags(parser, argv):
    """(every flag's value, the names of the flags typed on the command line). Parsed onto a
    namespace that already holds a placeholder for every flag, argparse fills in no default: what
    it changes there was typed."""
    values = vars(parser.parse_args(argv))
    unset = object()
    probe = vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(values, unset))))
    return values, {k for k, v in probe.items() if v is not unset}


def load_checkpoint(out_dir, flag="--resume"):
    """out_dir/ckpt.pt of this script, on the CPU; one line and exit 2 if missing or foreign."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        how = "give --out_dir"
        if flag == "--resume":
            how = "start without --resume, or give its --out_dir"
        die(f"{flag}: no checkpoint at {path}; {how} of a run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so in one line
        die(f"{flag}: {path} cannot be loaded ({type(e).__name__}: {first_line(e)})")
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
        die(f"{flag}: {path} is not a checkpoint of {SCRIPT}")
    return ckpt


def first_line(e, n=150):
    return (str(e).strip().splitlines() or [""])[0][:n]


def check_resume(cfg, ckpt, fixed, system):
    """Refuse a change to a flag the checkpoint's run is built on; say which other flags changed."""
    old = ckpt["config"]
    for k in fixed:
        if k in old and cfg[k] != old[k]:
            die(
                f"--resume: --{k} {cfg[k]} differs from the checkpoint's {old[k]}, which the run "
                f"is built on; resume with --{k} {old[k]}, or start a new --out_dir"
            )
    for k in sorted(cfg):
        if k in old and k not in system and k != "resume" and cfg[k] != old[k]:
            print(f"resume: --{k} changed from {old[k]} to {cfg[k]}")


def system_config(cfg):
    """--dtype and --compile as the device's defaults have them; one line for a missing device."""
    try:
        dev = torch.device(cfg["device"])
    except RuntimeError as e:
        die(f"--device {cfg['device']}: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        die(f"--device {cfg['device']}: CUDA is not available here; use --device cpu")
    dtype = cfg["dtype"] or ("bfloat16" if dev.type == "cuda" else "float32")
    compiled = dev.type == "cuda" if cfg["compile"] is None else cfg["compile"]
    return {"dtype": dtype, "compile": compiled}


# -----------------------------------------------------------------------------
# losses (seed 001's loss.py and trainer.py): small pure functions, checked by test_losses.py


def d_hinge_loss(real_logits, fake_logits):
    """mean(relu(1 - real)) + mean(relu(1 + fake)): 2 when every logit is 0."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def g_adversarial_loss(fake_logits):
    """-mean(fake_logits): G wants D's logits on its fakes as large as possible."""
    return -fake_logits.mean()


def r1_penalty(real_logits, real):
    """R1 (seed 001): mean over the batch of sum(grad^2), grad = d(sum of logits)/d(real).
    real must require grad."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def d_adv_loss(kind, real_logits, fake_logits):
    """D's adversarial loss on one path. hinge: seed 001's d_hinge_loss. nsgan: StarGAN v2's
    BCE(D(x), 1) + BCE(D(G(x, s)), 0) = mean softplus(-real) + mean softplus(fake). rpgan: R3GAN's
    mean softplus(fake - real), each fake paired with the real reference of its row."""
    if kind == "hinge":
        return d_hinge_loss(real_logits, fake_logits)
    if kind == "nsgan":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    if kind == "rpgan":
        return F.softplus(fake_logits - real_logits).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}")


def g_adv_loss(kind, fake_logits, real_logits=None):
    """G's adversarial loss on one path. hinge: seed 001's g_adversarial_loss (-mean). nsgan:
    BCE(D(G(x, s)), 1) = mean softplus(-fake). rpgan: mean softplus(real - fake), per pair."""
    if kind == "hinge":
        return g_adversarial_loss(fake_logits)
    if kind == "nsgan":
        return F.softplus(-fake_logits).mean()
    if kind == "rpgan":
        if real_logits is None:
            raise ValueError("rpgan's generator loss needs the real logits")
        return F.softplus(real_logits - fake_logits).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}")


def r1_r2_penalty(logits_of, real, fake):
    """R1 on real and R2 on the (detached) fakes, each seed 001's mean over its samples of
    sum(grad^2), from one double backward through D over both together: D has no
    batch-dependent layer, so one call computes what two compute. logits_of: x -> D's logits."""
    x = torch.cat([real, fake]).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(logits_of(x).sum(), x, create_graph=True)
    per_sample = grad.pow(2).flatten(1).sum(1)
    return per_sample[: len(real)].mean(), per_sample[len(real) :].mean()


def style_reconstruction_loss(pred_style, target_style):
    """L1(E(G(x, s)), s): the output's style must be recoverable."""
    return F.l1_loss(pred_style, target_style)


def diversity_sensitive_loss(fake_1, fake_2, margin=None):
    """L1(fake_1, fake_2), clamped at margin when one is set. It enters g_loss with a minus sign."""
    # under torchrun: the whole batch's, as one process
    dist = batch_mean(F.l1_loss(fake_1, fake_2))
    return dist.clamp(max=margin) if margin else dist


def cycle_consistency_loss(reconstructed, original):
    """L1(G(G(x, s_trg), s_src), x): translating back must recover the content."""
    return F.l1_loss(reconstructed, original)


def identity_loss(output, content):
    """L1(G(x, s_src), x): the source's own style must leave the content unchanged."""
    return F.l1_loss(output, content)


def self_similarity(x):
    """(B, C, H, W) latents -> (B, HW, HW): the cosine similarity of every two positions' latent
    vectors, each latent's mean vector taken away first. It says which parts of a latent are
    alike (the layout), not what they are; latents over 32x32 are average-pooled to 32x32."""
    if x.shape[-1] > 32 or x.shape[-2] > 32:
        x = F.adaptive_avg_pool2d(x, (min(x.shape[-2], 32), min(x.shape[-1], 32)))
    v = x.flatten(2)
    v = F.normalize(v - v.mean(2, keepdim=True), dim=1)
    return v.transpose(1, 2) @ v


def structure_loss(output, source):
    """L1(S(G(x, s)), S(x)), S = self_similarity: a translation keeps where its source's parts
    are, whatever they become (self-similarity as the structure to keep, as in LSeSim, Zheng et
    al. 2021, and Splice, Tumanyan et al. 2022, there on network features; here on the latent)."""
    return F.l1_loss(self_similarity(output), self_similarity(source))


def stats_loss(output, reference, extremes_of=None):
    """L1(T(G(x, sg(E(x_ref)))), T(x_ref)), T = style_features (each channel's mean and spread,
    its mean vertical and horizontal step): the reference's look reaches its translation, not only
    what E keeps of it (AdaIN's style loss, Huang & Belongie 2017, here on the latent). T does
    not see where things are, but a garment's size moves it as its brightness does; so the step
    holds E's style (sg, detached) and stats trains G to render what the style says, not E to
    say more: E asked for T carries the reference's size into the output (--stats_e does).
    extremes_of (--stats_max): a translation whose channels' largest and smallest values over the
    positions T also holds, against the reference's: the few brightest pixels that the moments
    average away (a dark garment's white seam, bright, against a pale one dimmed). The step passes
    the translation with E's style held, --stats_e or not: the extremes see a garment's size more
    than any moment, and E asked for them carries it (docs/style.md)."""

    def extremes(x):  # each channel's largest and smallest value over the positions
        x = x.float()
        return torch.cat([x.amax((2, 3)), x.amin((2, 3))], 1)

    t_out, t_ref = style_features(output), style_features(reference)
    if extremes_of is not None:
        t_out = torch.cat([t_out, extremes(extremes_of)], 1)
        t_ref = torch.cat([t_ref, extremes(reference)], 1)
    return F.l1_loss(t_out, t_ref)


def f_match_loss(s_f, s_e, n_proj=64, w_near=3.0):
    """F's styles onto E's, per domain, on draws of a fixed size: s_f, s_e (K, M, D), M styles of
    each domain by F (of fresh z) and by E (of real latents; detached: F moves, E does not). The
    sliced Wasserstein-1 distance (the mean L1 between the sorted projections on n_proj random
    unit directions), plus w_near times the mean distance from each of E's styles to its nearest
    of F's (root mean square over the dimensions): every real style must have a z near it
    (implicit maximum likelihood, Li & Malik 2019), so F's styles split into E's clusters (dim
    and bright) instead of one cloud between them (docs/style.md)."""
    proj = F.normalize(torch.randn(s_f.shape[2], n_proj, device=s_f.device), dim=0)
    swd = ((s_f @ proj).sort(1)[0] - (s_e @ proj).sort(1)[0]).abs().mean()
    near = torch.cdist(s_e, s_f).min(2)[0].mean() / math.sqrt(s_f.shape[2])
    return swd + w_near * near


def lambda_ds(epoch, w_ds, ds_decay_epochs):
    """w_ds at epoch 1, falling linearly to 0 at epoch ds_decay_epochs + 1 (0: no decay)."""
    if ds_decay_epochs <= 0:
        return float(w_ds)
    progress = min(max((epoch - 1) / ds_decay_epochs, 0.0), 1.0)
    return float(w_ds) * (1.0 - progress)


# -----------------------------------------------------------------------------
# networks: StarGAN v2's design, sized for 4-channel latents (32x32 at 256 px)


def he_init(module):
    """StarGAN v2's init (its core/utils.py), for G, E and F: He-normal weights (fan in, ReLU
    gain), zero biases. PyTorch's default init shrinks a signal by about sqrt(6) per Linear + ReLU
    layer: through F's 6 such layers its style of a z is nearly a constant per domain (measured:
    styles of two z differ by L1 0.002 against 0.7 with this init), so G stays blind to z."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ResBlk(nn.Module):
    """Pre-activation residual block: [IN] lrelu conv [pool] [IN] lrelu conv, plus a shortcut."""

    def __init__(self, dim_in, dim_out, normalize=False, downsample=False, sn=False):
        super().__init__()
        wrap = spectral_norm if sn else (lambda m: m)
        self.normalize, self.downsample = normalize, downsample
        self.conv1 = wrap(nn.Conv2d(dim_in, dim_in, 3, 1, 1))
        self.conv2 = wrap(nn.Conv2d(dim_in, dim_out, 3, 1, 1))
        if normalize:
            self.norm1 = nn.InstanceNorm2d(dim_in, affine=True)
            self.norm2 = nn.InstanceNorm2d(dim_in, affine=True)
        self.sc = wrap(nn.Conv2d(dim_in, dim_out, 1, bias=False)) if dim_in != dim_out else None

    def forward(self, x):
        s = x if self.sc is None else self.sc(x)
        r = self.norm1(x) if self.normalize else x
        r = self.conv1(F.leaky_relu(r, 0.2))
        if self.downsample:
            s, r = F.avg_pool2d(s, 2), F.avg_pool2d(r, 2)
        r = self.norm2(r) if self.normalize else r
        r = self.conv2(F.leaky_relu(r, 0.2))
        return (s + r) / math.sqrt(2)


class AdaIN(nn.Module):
    """Instance norm whose scale and shift come from the style: (1 + gamma(s)) * IN(x) + beta(s)."""

    def __init__(self, style_dim, channels):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.fc = nn.Linear(style_dim, 2 * channels)

    def forward(self, x, s):
        gamma, beta = self.fc(s)[:, :, None, None].chunk(2, dim=1)
        return (1 + gamma) * self.norm(x) + beta


class AdainResBlk(nn.Module):
    def __init__(self, dim_in, dim_out, style_dim, upsample=False):
        super().__init__()
        self.upsample = upsample
        self.norm1, self.norm2 = AdaIN(style_dim, dim_in), AdaIN(style_dim, dim_out)
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, 1, 1)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, 1, 1)
        self.sc = nn.Conv2d(dim_in, dim_out, 1, bias=False) if dim_in != dim_out else None

    def forward(self, x, s):
        sc = x if self.sc is None else self.sc(x)
        r = F.leaky_relu(self.norm1(x, s), 0.2)
        if self.upsample:
            sc = F.interpolate(sc, scale_factor=2, mode="nearest")
            r = F.interpolate(r, scale_factor=2, mode="nearest")
        r = self.conv2(F.leaky_relu(self.norm2(self.conv1(r), s), 0.2))
        return (sc + r) / math.sqrt(2)


class Generator(nn.Module):
    """G(content, s): instance-normalised encoder blocks, AdaIN decoder blocks, latents in and out.
    The output is linear: SD latents are unbounded, and a tanh clipped outliers into blotches."""

    def __init__(self, channels=4, dim=256, style_dim=64, n_blocks=6, n_down=1):
        super().__init__()
        half = n_blocks // 2
        self.from_latent = nn.Conv2d(channels, dim, 3, 1, 1)
        down = [ResBlk(dim, dim, normalize=True, downsample=i < n_down) for i in range(half)]
        up = [AdainResBlk(dim, dim, style_dim, upsample=i >= half - n_down) for i in range(half)]
        self.encode, self.decode = nn.ModuleList(down), nn.ModuleList(up)
        norm = nn.InstanceNorm2d(dim, affine=True)
        self.to_latent = nn.Sequential(norm, nn.LeakyReLU(0.2), nn.Conv2d(dim, channels, 1))
        self.apply(he_init)

    def forward(self, x, s):  # (B, C, H, W), (B, style_dim) -> (B, C, H, W)
        h = self.from_latent(x)
        for blk in self.encode:
            h = blk(h)
        for blk in self.decode:
            h = blk(h, s)
        return self.to_latent(h)


class MappingNetwork(nn.Module):
    """F(z, y): a shared MLP trunk, then one MLP head per domain; returns the head of domain y."""

    def __init__(
        self, latent_dim=16, style_dim=64, num_domains=2, hidden=512, n_shared=3, n_head=3
    ):
        super().__init__()
        layers = []
        for i in range(n_shared):
            layers += [nn.Linear(latent_dim if i == 0 else hidden, hidden), nn.ReLU()]
        self.shared = nn.Sequential(*layers)

        def head():
            layers = [m for _ in range(n_head) for m in (nn.Linear(hidden, hidden), nn.ReLU())]
            return nn.Sequential(*layers, nn.Linear(hidden, style_dim))

        self.heads = nn.ModuleList(head() for _ in range(num_domains))
        self.apply(he_init)

    def forward(self, z, y):  # (B, latent_dim), (B,) -> (B, style_dim)
        h = self.shared(z)
        out = torch.stack([head(h) for head in self.heads], dim=1)  # (B, domains, style_dim)
        return out[torch.arange(len(y), device=y.device), y]


def conv_trunk(channels, size, dim, max_dim, sn):
    """E's and D's trunk: a conv, up to 3 residual blocks halving the size to 4x4, a conv to 1x1."""
    n_down = max(0, min(3, int(math.log2(size)) - 2))
    wrap = spectral_norm if sn else (lambda m: m)
    layers, d = [wrap(nn.Conv2d(channels, dim, 3, 1, 1))], dim
    for _ in range(n_down):
        layers.append(ResBlk(d, min(2 * d, max_dim), downsample=True, sn=sn))
        d = min(2 * d, max_dim)
    k = size >> n_down
    layers += [nn.LeakyReLU(0.2), wrap(nn.Conv2d(d, d, k, 1, 0)), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers), d


class StyleEncoder(nn.Module):
    """E(x, y): a conv trunk, then one linear head per domain (one matmul); the head of domain y."""

    def __init__(self, channels=4, size=32, style_dim=64, num_domains=2, dim=128, max_dim=512):
        super().__init__()
        self.trunk, d = conv_trunk(channels, size, dim, max_dim, sn=False)
        self.heads = nn.Linear(d, num_domains * style_dim)
        self.style_dim = style_dim
        self.apply(he_init)

    def forward(self, x, y):
        out = self.heads(self.trunk(x).flatten(1)).view(len(y), -1, self.style_dim)
        return out[torch.arange(len(y), device=y.device), y]


class Discriminator(nn.Module):
    """D(x, y): a conv trunk with spectral norm on every conv and no instance norm (it would erase
    the per-channel statistics that carry style), one logit per domain; the logit of domain y."""

    def __init__(self, channels=4, size=32, num_domains=2, dim=128, max_dim=512):
        super().__init__()
        self.trunk, d = conv_trunk(channels, size, dim, max_dim, sn=True)
        self.head = spectral_norm(nn.Conv2d(d, num_domains, 1))

    def forward(self, x, y):  # -> (B,) logits
        out = self.head(self.trunk(x)).flatten(1)
        return out[torch.arange(len(y), device=y.device), y]


# -----------------------------------------------------------------------------
# data and the VAE


def load_latents(path):
    """The latents .pt of encode_latents.py, checked. ValueError says what is wrong with it."""
    if not os.path.exists(path):
        raise ValueError(f"no such file; make one with encode_latents.py --out {path}")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot be loaded ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(d, dict) or not {"latents", "labels", "domains"} <= set(d):
        raise ValueError(
            "not a latents file of encode_latents.py (it needs 'latents', 'labels', 'domains')"
        )
    lat, labels, domains = d["latents"], d["labels"], list(d["domains"])
    if not torch.is_tensor(lat) or lat.dim() != 4:
        shape = tuple(getattr(lat, "shape", ()))
        raise ValueError(f"latents of shape {shape}, expected (N, C, H, W)")
    if not torch.is_tensor(labels) or labels.shape != (len(lat),):
        shape = tuple(getattr(labels, "shape", ()))
        raise ValueError(f"{len(lat)} latents but labels of shape {shape}")
    views = d.get("views")
    if views is not None and (views.dim() != 5 or views.shape[:1] + views.shape[2:] != lat.shape):
        raise ValueError(f"views of shape {tuple(views.shape)}, expected (N, Z, C, H, W)")
    if len(domains) < 2:
        raise ValueError(
            f"{len(domains)} domain ({', '.join(domains)}); the StarGAN translates between "
            "domains and needs at least 2"
        )
    counts = torch.bincount(labels.long(), minlength=len(domains))
    if len(counts) > len(domains) or labels.min() < 0 or (counts < 2).any():
        raise ValueError(
            f"labels must be 0..{len(domains) - 1} with at least 2 latents per domain (counts "
            f"{counts.tolist()})"
        )
    return d


def split_domains(labels, n_domains, val_fraction):
    """A fixed held-out split per domain (the same for every seed, so runs compare): at least 2
    held out (a covariance) and at most half. Returns (train, held-out) index lists per domain."""
    gen, train, val = torch.Generator().manual_seed(1234), [], []
    for d in range(n_domains):
        idx = torch.nonzero(labels == d).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = math.ceil(val_fraction * len(idx)) if val_fraction > 0 else 0
        n_val = min(len(idx) // 2, max(n_val, 2)) if n_val else 0
        val.append(idx[:n_val]), train.append(idx[n_val:])
    return train, val


def load_vae(name, subfolder, device, dtype):
    """diffusers' AutoencoderKL from a Hub id or a local folder, in eval mode. ValueError says
    how to fix it."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging

    levels = diffusers_logging.get_verbosity(), hub_logging.get_verbosity()
    diffusers_logging.set_verbosity_error(), hub_logging.set_verbosity_error()  # one line: ours
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            kw = dict(subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=False)
            vae = AutoencoderKL.from_pretrained(name, **kw)
    except Exception as e:  # OSError offline or for a wrong folder, ValueError for a bad id, ...
        where = f"'{name}'" + (f" (subfolder '{subfolder}')" if subfolder else "")
        local = os.path.basename(name.rstrip("/")) or "vae"
        hint = (
            f"Offline? Download it where there is a network (hf download {name} --local-dir "
            f"{local}), copy the folder here and pass it: --vae {local}"
        )
        if os.path.isdir(name):
            hint = "A folder given as --vae holds what AutoencoderKL.save_pretrained writes."
        raise ValueError(
            f"cannot load the VAE {where}: {type(e).__name__}: {first_line(e, 160)} {hint}"
        ) from None
    finally:
        diffusers_logging.set_verbosity(levels[0]), hub_logging.set_verbosity(levels[1])
    return vae.to(device).eval().requires_grad_(False)


def samples_vae(cfg, meta, device):
    """The VAE the latents file names, to decode sample grids; None, said in one line, where it
    cannot load (offline, say) or --no-decode: the grids then show latent mosaics."""
    vae, note = None, ""
    if cfg["decode"] and meta.get("vae"):
        try:
            vae_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            vae = load_vae(meta["vae"], meta.get("subfolder"), device, vae_dtype)
        except ValueError as e:
            note = str(e).split(" Offline?")[0] + "; "
    if vae is None:
        mosaic = "each latent's 4 channels as a 2x2 grayscale mosaic instead of decoded images"
        print(f"samples: {note}saving {mosaic}")
    return vae


def latent_mosaic(lat, real):
    """(N, 4, h, w) latents -> (N, 1, 2h, 2w) grayscale: the 4 channels as a 2x2 mosaic, each
    channel's real mean +- 3 std (of the real latents `real`) -> [-1, 1], on the data's scale."""
    mean, std = real.mean((0, 2, 3), keepdim=True), real.std((0, 2, 3), keepdim=True) + 1e-6
    x = ((lat - mean) / (3 * std)).clamp(-1, 1)
    if x.shape[1] < 4:
        x = torch.cat([x, -torch.ones_like(x[:, : 4 - x.shape[1]])], 1)
    top, bottom = torch.cat([x[:, 0:1], x[:, 1:2]], 3), torch.cat([x[:, 2:3], x[:, 3:4]], 3)
    return torch.cat([top, bottom], 2)


def random_views(n, flip, shift, zoom, size, device):
    """n random geometries, as the affine matrices (n, 2, 3) of view(): each mirrored left-right
    with probability flip, shifted by up to shift of the size (H, W) in whole latent pixels, and
    zoomed in [1 - zoom, 1 + zoom]. From the global RNG, as the batch is (torchrun: sliced)."""
    (H, W), theta = size, torch.zeros(n, 2, 3, device=device)
    mirror = torch.where(torch.rand(n, device=device) < flip, -1.0, 1.0)
    scale = 1 / (1 + zoom * (2 * torch.rand(n, device=device) - 1))
    theta[:, 0, 0], theta[:, 1, 1] = mirror * scale, scale
    for i, side in ((0, W), (1, H)):  # a shift of k pixels is 2k/side in grid coordinates
        k = int(shift * side)
        theta[:, i, 2] = torch.randint(-k, k + 1, (n,), device=device) * 2 / side
    return theta


def view(x, theta):
    """Latents (B, C, H, W) moved by affine matrices theta (B, 2, 3) of random_views(): bilinear,
    the border repeated. A mirror or a whole-pixel shift alone moves pixels exactly."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class AdaptiveAugment:
    """ADA (StyleGAN2-ADA, Karras et al. 2020) on latents. Every latent D sees goes through one
    pipe of geometric ops, each applied per latent with probability p: a left-right mirror, an
    integer translation by up to 1/8 of the width and height (the border repeated), and a cutout
    of a square half the latent's side; no colour op, as a latent is not an image (docs/ada.md).
    Every --ada_interval steps p moves by sign(r_t - ada_target) * batch * interval / (ada_kimg *
    1000), clamped to [0, ada_p_max], where r_t = E[sign(D(x_ref))] over those steps (the ranks'
    mean under torchrun); --ada_p fixes p. Its draws come from its own generator, so the run's
    other draws are those of a run without it, and p = 0 computes what that run computes. p, r_t's
    sum and the generator are state."""

    def __init__(self, cfg, device, state=None):
        self.target, self.interval = cfg["ada_target"], cfg["ada_interval"]
        self.p_max = cfg["ada_p_max"]
        self.speed = cfg["batch_size"] * cfg["ada_interval"] / (cfg["ada_kimg"] * 1000)
        self.gen = torch.Generator(device).manual_seed(cfg["seed"])
        self.p = torch.tensor(float(cfg["ada_p"] or 0.0), device=device)
        self.rt_sum = torch.zeros((), device=device)
        if state is not None:
            self.p.fill_(state["p"]), self.rt_sum.fill_(state["rt_sum"])
            self.gen.set_state(state["gen"])

    def draw(self, n, size):
        """The pipe's draws for n latents of size (H, W): the rows and columns each output pixel
        reads ((n, H), (n, W): a mirror and a translation, the border repeated) and the cutout
        masks (n, 1, H, W). Every draw is made whatever p, so the stream does not depend on p."""
        (H, W), g, dev = size, self.gen, self.p.device
        on = torch.rand(3, n, generator=g, device=dev) < self.p  # per op, per latent
        reads = []
        for side in (H, W):
            k = max(1, round(side / 8))
            shift = torch.randint(-k, k + 1, (n, 1), generator=g, device=dev) * on[1, :, None]
            reads.append((torch.arange(side, device=dev) - shift).clamp(0, side - 1))
        rows, cols = reads
        cols = torch.where(on[0, :, None], W - 1 - cols, cols)  # the mirror
        centre = torch.rand(2, n, 1, 1, generator=g, device=dev)
        xs, ys = ((torch.arange(m, device=dev) + 0.5) / m for m in (W, H))
        in_x = (xs.view(1, 1, W) - centre[0]).abs() < 0.25
        cut = in_x & ((ys.view(1, H, 1) - centre[1]).abs() < 0.25)
        return rows, cols, (~(cut & on[2].view(n, 1, 1))).float()[:, None]

    def step(self, sign_mean, step):
        """After a step: add its mean sign(D(x_ref)); every interval steps, move p (adaptive)."""
        self.rt_sum += sign_mean
        if step % self.interval == 0:
            self.share()
            if self.target is not None:
                move = torch.sign(self.rt_sum / self.interval - self.target) * self.speed
                self.p.copy_((self.p + move).clamp(0, self.p_max))
            self.rt_sum.zero_()

    def share(self):
        """Under torchrun, every rank's r_t sum so far becomes the ranks' mean (the checkpoint
        saves rank 0's), which leaves the mean every interval takes as it was."""
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.rt_sum, op=torch.distributed.ReduceOp.AVG)

    def state(self):
        return {"p": float(self.p), "rt_sum": float(self.rt_sum), "gen": self.gen.get_state()}


def rank_rows(t, parts, mine):
    """Draws t made for `parts` global batches stacked (each row of t, one latent's), as this
    rank's rows: its slice `mine` of each part, the parts in order (torchrun; else all of t)."""
    return torch.cat([c[mine] for c in t.chunk(parts)])


def augment(x, pipe):
    """Latents (n, C, H, W) through the ADA pipe's draws (rows, cols, masks) for them: every
    output pixel a copy of one input pixel, or 0 under a cutout, so p = 0 gives x exactly, and
    the gradient flows back the same way."""
    if pipe is None:
        return x
    rows, cols, mask = pipe
    n = torch.arange(len(x), device=x.device)[:, None, None]
    return x[n, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous() * mask


# -----------------------------------------------------------------------------
# files: atomic writes, so an interrupted run never leaves half a file; grids; the checkpoint


def save_json_atomic(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def save_torch_atomic(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_grid(images, path, nrow, pad=2, scale=1):
    """images (N, C, H, W) in [-1, 1], C = 1 or 3, to one PNG of nrow columns on black."""
    from PIL import Image

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    grid = torch.zeros(c, pad + math.ceil(n / nrow) * (h + pad), pad + nrow * (w + pad))
    for i in range(n):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    grid = grid.to(torch.uint8)
    img = Image.fromarray(grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy())
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


class SampleGrids:
    """One grid per save: a row per held-out source, the source first, then its translations by
    one held-out reference of each domain (the references along the top row), then into each
    domain by one fixed z. Decoded through the VAE, or as latent mosaics without one."""

    def __init__(self, cfg, latents, labels, K, pool, vae):
        gen = torch.Generator().manual_seed(cfg["seed"] + 1)
        device = latents.device
        self.src = pool[torch.randperm(len(pool), generator=gen)[: cfg["n_samples"]].to(device)]
        self.refs = torch.stack([pool[torch.nonzero(labels[pool] == d)[0, 0]] for d in range(K)])
        self.z = torch.randn(K, cfg["latent_dim"], generator=gen).to(device)
        self.cfg, self.latents, self.labels, self.vae, self.K = cfg, latents, labels, vae, K

    @torch.no_grad()
    def save(self, G, E, F_, ctx, path):
        cfg, K, vae = self.cfg, self.K, self.vae
        x_src, x_ref = self.latents[self.src], self.latents[self.refs]
        n, ar = len(x_src), torch.arange(K, device=x_src.device)
        with ctx:
            s_ref, s_lat = E(x_ref, self.labels[self.refs]), F_(self.z, ar)
            styles = torch.cat([s_ref, s_lat]).repeat(n, 1)
            out = G(x_src.repeat_interleave(2 * K, 0), styles).float()
        out = out.view(n, 2 * K, *x_src.shape[1:])
        blank = torch.full_like(x_src[:1], float("nan"))
        top = torch.cat([blank, x_ref] + [blank] * K)
        cells = torch.cat([top] + [torch.cat([x_src[i : i + 1], out[i]]) for i in range(n)])
        empty = torch.isnan(cells).flatten(1).any(1)
        cells = torch.nan_to_num(cells)
        if vae is not None:  # unscale, decode in chunks
            chunks = (c / cfg["latent_scale"] for c in cells.split(16))
            imgs, scale = torch.cat([vae.decode(c.to(vae.dtype)).sample.float() for c in chunks]), 1
        else:
            imgs = latent_mosaic(cells, torch.cat([x_src, x_ref]))
            scale = max(1, 128 // (2 * cells.shape[-2]))
        imgs[empty] = -1  # black where there is no image
        save_grid(imgs, path, nrow=2 * K + 1, scale=scale)


def checkpoint(cfg, run, modules, device):
    """Everything --resume needs, in plain types: where the run stands (run: step, epoch, elapsed,
    the epoch's permutation and partial sums), the state of every module, optimizer and scaler
    (the raw modules, never a compiled wrapper), the RNG states and the config."""
    rng_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    states = {k: m.state_dict() for k, m in modules.items()}
    rng = {"rng_cpu": torch.get_rng_state(), "rng_cuda": rng_cuda}
    return {"script": SCRIPT, "config": cfg, **run, **states, **rng}


def restore(ckpt, modules, device):
    """Load a checkpoint's module, optimizer and scaler states and its RNG states. ValueError says
    what does not fit (a checkpoint of other shapes)."""
    try:
        for k, m in modules.items():
            m.load_state_dict(ckpt[k])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(" ".join(str(e).split())[:220]) from None
    torch.set_rng_state(ckpt["rng_cpu"])
    if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng_cuda"], device)


def resume(cfg, ckpt, modules, device, verbose=True):
    """Loads a checkpoint into modules, with the flags' learning rates, betas and weight decay
    (not the saved ones). Returns where the run stands, and the log's records up to its step."""
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    try:
        restore(ckpt, modules, device)
    except ValueError as e:  # e.g. --data with another number of domains
        die(
            f"--resume: {ckpt_path} does not fit this run ({e}); resume with the data and "
            "flags it was made with, or use a new --out_dir"
        )
    opt_G, opt_D = modules["opt_G"], modules["opt_D"]
    for opt, lrs in ((opt_G, (cfg["lr"], cfg["f_lr"])), (opt_D, (cfg["lr"],))):
        for group, lr in zip(opt.param_groups, lrs):
            group.update(lr=lr, betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"])
    step, epoch = ckpt["step"], ckpt["epoch"]
    if verbose:
        print(f"resumed from {ckpt_path} at step {step} (epoch {epoch})")
    records = load_records(os.path.join(cfg["out_dir"], "log.json"), step)
    return step, epoch, ckpt["sums"], ckpt["elapsed"], records


def load_records(log_path, step):
    """The records of an earlier log.json up to a checkpoint's step (the later ones are redone)."""
    if not os.path.exists(log_path):
        return []
    with open(log_path) as f:
        old = json.load(f)
    return [r for r in old.get("records", []) if r["step"] <= step and not r.get("partial")]


# -----------------------------------------------------------------------------
# evaluation: our own domain classifier on latents, trained on the training split, and figures in
# its feature space. Not Inception FID or LPIPS: they compare runs of this project with each other.


def frechet_distance(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + tr(s1 + s2 - 2 (s1 s2)^(1/2)) between two Gaussians, in float64.
    tr (s1 s2)^(1/2) is computed as tr (s1^(1/2) s2 s1^(1/2))^(1/2), from two symmetric
    eigendecompositions: no complex parts, no scipy, and stable for singular covariances."""
    mu1, s1, mu2, s2 = (np.asarray(a, dtype=np.float64) for a in (mu1, s1, mu2, s2))
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # s1^(1/2)
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


class DomainClassifier(nn.Module):
    """A latent's domain, by a small conv net; its 64 ReLU features are the evaluation's space."""

    def __init__(self, channels=4, num_domains=2, width=32):
        super().__init__()
        w = width
        conv = [nn.Conv2d(channels, w, 3, 1, 1), nn.ReLU(), nn.Conv2d(w, 2 * w, 3, 2, 1), nn.ReLU()]
        conv += [nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*conv, nn.Linear(4 * w, 64), nn.ReLU())
        self.head = nn.Linear(64, num_domains)

    def forward(self, x):  # (B, C, H, W) scaled latents -> features (B, 64), logits (B, domains)
        f = self.features(x)
        return f, self.head(f)


def train_classifier(make, x, y, device, batch_size=128, min_steps=600, min_epochs=3, seed=0):
    """Train the classifier make() builds on inputs x with labels y (Adam, cross-entropy), leaving
    the global RNG as it was. Returns it in eval mode, without gradients."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        clf = make().to(device)
        opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
        steps_per_epoch = max(1, len(x) // batch_size)
        with torch.enable_grad():
            for s in range(max(min_steps, min_epochs * steps_per_epoch)):
                if s % steps_per_epoch == 0:
                    perm = torch.randperm(len(x), device=device)
                i = s % steps_per_epoch
                idx = perm[i * batch_size : (i + 1) * batch_size]
                loss = F.cross_entropy(clf(x[idx])[1], y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return clf.eval().requires_grad_(False)


def cached_classifier(path, make, fit, device):
    """(classifier, seconds spent training or None): loaded from path if it is there, else trained
    by fit() and saved there. Building the module draws from the RNG: fork it where training's RNG
    must stay as it was."""
    if os.path.exists(path):
        clf = make().to(device)
        clf.load_state_dict(torch.load(path, map_location=device, weights_only=True)["state"])
        return clf.eval().requires_grad_(False), None
    t = time.perf_counter()
    clf = fit()
    save_torch_atomic({"state": clf.state_dict()}, path)
    return clf, time.perf_counter() - t


@torch.no_grad()
def embed(clf, x, batch_size=1000):
    """Features (float64 numpy) and class probabilities of inputs x under the classifier."""
    feats, probs = [], []
    for chunk in x.split(batch_size):
        f, logits = clf(chunk.float())
        feats.append(f.double().cpu()), probs.append(torch.softmax(logits.double(), 1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def prdc(real_features, fake_features, k=5, chunk=1024):
    """Precision, recall, density and coverage (Naeem et al. 2020) of fake features against real
    ones. r_k(a) is the distance from a to its k-th nearest neighbour in its own set. precision:
    the share of fakes within r_k(x) of some real x; recall: the share of reals within r_k(y) of
    some fake y; density: (1 / kM) times the number, summed over the M fakes, of reals x whose
    r_k(x) holds the fake; coverage: the share of reals whose nearest fake is within their own
    r_k. Computed chunk by chunk with torch.cdist on the features' device: no N x M matrix."""
    real = torch.as_tensor(real_features)
    fake = torch.as_tensor(fake_features).to(real.device, real.dtype)
    k = max(1, min(k, len(real) - 1, len(fake) - 1))  # a set of n points has n - 1 neighbours
    r_real, r_fake = knn_radii(real, k, chunk), knn_radii(fake, k, chunk)
    precise, dense = 0, 0
    recalled = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    nearest = torch.full((len(real),), float("inf"), device=real.device)
    for c, r in zip(fake.split(chunk), r_fake.split(chunk)):
        d = torch.cdist(c, real)  # (chunk, N): these fakes against every real
        inside = d < r_real  # fake j inside real i's ball
        precise += int(inside.any(1).sum())
        dense += int(inside.sum())
        recalled |= (d < r[:, None]).any(0)  # real i inside fake j's ball
        nearest = torch.minimum(nearest, d.min(0).values)
    m, n = len(fake), len(real)
    return {
        "precision": precise / m,
        "recall": int(recalled.sum()) / n,
        "density": dense / (k * m),
        "coverage": int((nearest < r_real).sum()) / n,
    }


def knn_radii(x, k, chunk=1024):
    """Each row's distance to its k-th nearest neighbour among the rows (itself left out)."""
    return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk)])


def gaussian(f):
    """Mean and covariance of features f (n, d); one sample has zero covariance (np.cov: NaN)."""
    d = f.shape[1]
    return f.mean(0), (np.cov(f, rowvar=False) if len(f) > 1 else np.zeros((d, d)))


def mean_pairwise_l1(x):
    """The mean over all pairs i < j of mean |x_i - x_j|: div's measure, for a set of latents."""
    f = x.flatten(1).double()
    return float(torch.cdist(f, f, p=1).sum() / (f.shape[1] * len(f) * (len(f) - 1)))


CONTENT_SOURCES = 200  # sources per domain in content's pairs (6 x 200 x 200 distances, n_div 4)


def style_features(x):
    """A latent's style statistics (N, C, H, W) -> (N, 4C): each channel's mean and spread over
    the positions, and its mean vertical and horizontal step: what an AdaIN layer can set, and
    texture, but not where things are (a mirror leaves them as they are, a shift nearly so)."""
    x = x.float()
    steps = [(x.diff(dim=d).abs().mean((2, 3))) for d in (2, 3)]
    return torch.cat([x.mean((2, 3)), x.std((2, 3)), *steps], 1)


def content_score(sources, outs):
    """content: whether translations keep their sources, label-free. sources (n, C, H, W), all
    of one domain; outs (m, n, C, H, W), their translations into one other domain under m styles
    that every source shares. Over every pair of translations under two different styles, the
    Pearson correlation between how far apart (Euclidean) their sources are (0 for the same source)
    and how far apart they are. 1: G = identity; 0: the source does not matter (G copies its
    reference, or draws from the style alone), near 0 where the style matters far more."""
    m = len(outs)
    src = sources.flatten(1).double()
    o = outs.flatten(2).double()
    d_src = torch.cdist(src, src).flatten()
    pairs = [(torch.cdist(o[j], o[k]).flatten(), d_src) for j in range(m) for k in range(j + 1, m)]
    b, a = (torch.cat(v) for v in zip(*pairs))
    a, b = a - a.mean(), b - b.mean()
    norm = float(a.norm() * b.norm())
    return float((a * b).sum()) / norm if norm > 0 else 0.0


class TranslationEvaluator:
    """On the held-out latents, with the EMA networks: each source into every other domain, by a
    reference (a held-out latent of that domain) and by a fixed z. In the feature space of a
    domain classifier trained on the training split (cached in out_dir, keyed by the data):
    acc_ref, acc_lat, fd_<domain>, fd_mean, prdc's figures per domain and their means; in latent
    space: div, cyc_err, content_ref, content_lat; in style_features' space: style_lat, style_ref,
    style_cov (docs/latent_stargan.md#evaluation). `reference` holds clf_acc and the held-out real
    latents' figures in their place: fd_real, div_real, <prdc figure>_real, style_cov_real."""

    def __init__(self, cfg, meta, latents, labels, train_idx, val_idx, ctx):
        self.cfg, self.meta, self.latents, self.labels, self.ctx = cfg, meta, latents, labels, ctx
        self.train_idx, self.val_idx, self.domains = train_idx, val_idx, list(meta["domains"])
        self.clf = None

    def setup(self):
        cfg, latents, labels, device = self.cfg, self.latents, self.labels, self.latents.device
        K, C = len(self.domains), latents.shape[1]
        tag = self.meta["latents"].numpy().tobytes() + self.meta["labels"].numpy().tobytes()
        tag += f"{cfg['val_fraction']} DomainClassifier 32".encode()
        path = os.path.join(cfg["out_dir"], f"classifier_{hashlib.sha1(tag).hexdigest()[:16]}.pt")
        val, y_val = self.val_idx.cpu().numpy(), labels[self.val_idx].cpu().numpy()
        make = lambda: DomainClassifier(C, K)  # noqa: E731
        x, y = latents[self.train_idx], labels[self.train_idx]
        train = lambda: train_classifier(make, x, y, device)  # noqa: E731
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.clf, took = cached_classifier(path, make, train, device)
        f_all, p_all = embed(self.clf, latents)
        acc = float((p_all[val].argmax(1) == y_val).mean())
        if took is not None:
            print(
                f"evaluation classifier: trained in {took:.0f}s on {len(self.train_idx)} "
                f"latents, held-out accuracy {acc:.3f}; cached in {path}"
            )
        if acc < cfg["min_clf_acc"]:
            print(
                f"warning: the domain classifier's held-out accuracy is {acc:.3f} (< --min_clf_acc "
                f"{cfg['min_clf_acc']}): acc_ref, acc_lat and fd mean little with it",
                file=sys.stderr,
            )
        all_labels = self.meta["labels"].numpy()
        self.real = [gaussian(f_all[all_labels == d]) for d in range(K)]  # each domain's latents
        f_val = f_all[val]
        fd_real = [frechet_distance(*gaussian(f_val[y_val == d]), *self.real[d]) for d in range(K)]
        x_val, y_v = latents[self.val_idx], labels[self.val_idx]
        div_real = [mean_pairwise_l1(x_val[y_v == d]) for d in range(K)]  # div's measure, real data
        self.reference = {"clf_acc": acc, "fd_real": float(np.mean(fd_real))}
        self.reference["div_real"] = float(np.mean(div_real))
        # PRDC against each domain's training latents, which hold no held-out one: a fair reference
        f_t, y_t = f_all[self.train_idx.cpu().numpy()], labels[self.train_idx].cpu().numpy()
        self.train_feats = [torch.from_numpy(f_t[y_t == d]).float().to(device) for d in range(K)]
        f_v = [torch.from_numpy(f_val[y_val == d]).float() for d in range(K)]
        real = [prdc(self.train_feats[d], f_v[d]) for d in range(K)]
        for m in PRDC:
            self.reference[f"{m}_real"] = float(np.mean([r[m] for r in real]))
        # style: features scaled by their spread over the real latents, each domain's training set
        self.style_scale = style_features(latents).std(0).clamp_min(1e-8)
        s_t = style_features(latents[self.train_idx]) / self.style_scale
        self.train_style = [s_t[labels[self.train_idx] == d] for d in range(K)]
        s_v = style_features(x_val) / self.style_scale
        cov = [prdc(self.train_style[d], s_v[y_v == d])["coverage"] for d in range(K)]
        self.reference["style_cov_real"] = float(np.mean(cov))

    @torch.no_grad()
    def __call__(self, G, E, F_, epoch):
        t0 = time.perf_counter()  # the first call's includes the classifier's set-up
        if self.clf is None:
            self.setup()
        cfg, latents, labels, ctx = self.cfg, self.latents, self.labels, self.ctx
        K, device, val_idx = len(self.domains), latents.device, self.val_idx
        gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 2)  # not the training RNG
        x, y = latents[val_idx], labels[val_idx]
        y_t = torch.cat([(y + k) % K for k in range(1, K)])  # every source into every other domain
        x_s, y_s = x.repeat(K - 1, 1, 1, 1), y.repeat(K - 1)
        per_dom = [val_idx[labels[val_idx] == d] for d in range(K)]

        def draw(g):  # a held-out reference of its target domain and a z, for every source
            picks = [
                per_dom[t][torch.randint(len(per_dom[t]), (), generator=g, device=device)]
                for t in y_t.tolist()
            ]
            z = torch.randn(len(x_s), cfg["latent_dim"], generator=g, device=device)
            return torch.stack(picks), z

        refs, z = draw(gen)
        # a second reference and a second z for every source, for the style measures (from a
        # generator of their own: the other figures' draws stay as they were)
        refs_2, z_2 = draw(torch.Generator(device=device).manual_seed(cfg["seed"] + 3))
        fake_ref, fake_lat, rec, style_pairs = [], [], [], []
        for i in range(0, len(x_s), 256):
            sl = slice(i, i + 256)
            with ctx:
                fr = G(x_s[sl], E(latents[refs[sl]], y_t[sl])).float()
                fl = G(x_s[sl], F_(z[sl], y_t[sl])).float()
                rc = G(fl, E(x_s[sl], y_s[sl])).float()
                fr_2 = G(x_s[sl], E(latents[refs_2[sl]], y_t[sl])).float()
                fl_2 = G(x_s[sl], F_(z_2[sl], y_t[sl])).float()
            fake_ref.append(fr), fake_lat.append(fl), rec.append(rc)
            style_pairs.append([style_features(v) for v in (fr, fr_2, fl, fl_2)])
        fake_ref, fake_lat, rec = torch.cat(fake_ref), torch.cat(fake_lat), torch.cat(rec)
        s_fr, s_fr2, s_fl, s_fl2 = (torch.cat(v) / self.style_scale for v in zip(*style_pairs))
        s_r, s_r2 = (style_features(latents[r]) / self.style_scale for r in (refs, refs_2))
        apart = (s_r - s_r2).norm(dim=1).sum().clamp_min(1e-12)  # two real latents of a domain
        style = {"style_ref": float((s_fr - s_fr2).norm(dim=1).sum() / apart)}
        style["style_lat"] = float((s_fl - s_fl2).norm(dim=1).sum() / apart)
        # div and content: each domain's sources into the next domain, (y + 1) % K, under n_div
        # styles that all of them share: n_div z, and n_div held-out references of that domain
        div, n_div, content = [], cfg["n_div"], {"ref": [], "lat": []}
        pairs = [(a, b) for a in range(n_div) for b in range(a + 1, n_div)]
        for a in range(K):
            t, xa = (a + 1) % K, x[y == a]
            ys = torch.full((n_div,), t, device=device)
            pick = torch.randint(len(per_dom[t]), (n_div,), generator=gen, device=device)
            refs = per_dom[t][pick]
            zs = torch.randn(n_div, cfg["latent_dim"], generator=gen, device=device)
            for path in ("ref", "lat"):
                with ctx:
                    s = E(latents[refs], ys) if path == "ref" else F_(zs, ys)
                    outs = [
                        [G(c, s[j].expand(len(c), -1)).float() for c in xa.split(256)]
                        for j in range(n_div)
                    ]
                outs = torch.stack([torch.cat(o) for o in outs])  # (n_div, sources, C, H, W)
                if path == "lat":
                    dist = [(outs[i] - outs[j]).abs().flatten(1).mean(1) for i, j in pairs]
                    div.append(torch.stack(dist).mean(0))
                content[path].append(content_score(xa[:CONTENT_SOURCES], outs[:, :CONTENT_SOURCES]))
        t = y_t.cpu().numpy()
        f_lat, p_lat = embed(self.clf, fake_lat)
        _, p_ref = embed(self.clf, fake_ref)
        out = {"acc_ref": float((p_ref.argmax(1) == t).mean())}
        out["acc_lat"] = float((p_lat.argmax(1) == t).mean())
        for k, d in enumerate(self.domains):
            out[f"fd_{d}"] = frechet_distance(*gaussian(f_lat[t == k]), *self.real[k])
        out["fd_mean"] = float(np.mean([out[f"fd_{d}"] for d in self.domains]))
        # as many translations into a domain as it has held-out latents: the reference's
        n_held = [int((labels[val_idx] == k).sum()) for k in range(K)]
        per = {}
        for k, d in enumerate(self.domains):
            per[d] = prdc(self.train_feats[k], torch.from_numpy(f_lat[t == k][: n_held[k]]).float())
        for m in PRDC:  # each target domain's, and their mean
            out.update({f"{m}_{d}": per[d][m] for d in self.domains})
            out[m] = float(np.mean([per[d][m] for d in self.domains]))
        out["div"] = float(torch.cat(div).mean())
        out["content_ref"] = float(np.mean(content["ref"]))
        out["content_lat"] = float(np.mean(content["lat"]))
        out["cyc_err"] = float((rec - x_s).abs().mean())
        out.update(style)
        cov = [prdc(self.train_style[k], s_fl[y_t == k][: n_held[k]]) for k in range(K)]
        out["style_cov"] = float(np.mean([c["coverage"] for c in cov]))
        ref = self.reference
        print(
            f"eval epoch {epoch}: acc_ref {out['acc_ref']:.3f} acc_lat {out['acc_lat']:.3f} "
            f"fd_mean {out['fd_mean']:.3f} (real latents {ref['fd_real']:.3f}) div "
            f"{out['div']:.4f} (real latents {ref['div_real']:.4f}) content_ref "
            f"{out['content_ref']:.3f} content_lat {out['content_lat']:.3f} cyc_err "
            f"{out['cyc_err']:.4f} coverage {out['coverage']:.3f} (real latents "
            f"{ref['coverage_real']:.3f}) style_lat {out['style_lat']:.3f} style_ref "
            f"{out['style_ref']:.3f} style_cov {out['style_cov']:.3f} (real latents "
            f"{ref['style_cov_real']:.3f}) in {time.perf_counter() - t0:.1f}s"
        )
        return out


# -----------------------------------------------------------------------------
# torchrun: N processes compute what one computes at the same global batch. Every rank draws the
# same global random numbers and works on its own slice; gradients and logged values are averaged.


def init_distributed(device, backend=None):
    """(rank, world size, device) of this process. Under torchrun (RANK in the environment) it
    joins the process group: NCCL and one GPU per local rank on CUDA, else gloo (or backend);
    without torchrun, (0, 1, device) and nothing changes."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def batch_mean(x):
    """x, the mean of something over this rank's slice of the batch, as its mean over the whole
    batch (the slices are equal): the value is averaged over the ranks, the gradient stays this
    rank's (average_gradients averages it after backward). Without torchrun, x."""
    if not torch.distributed.is_initialized():
        return x
    mean = x.detach().clone()
    torch.distributed.all_reduce(mean, op=torch.distributed.ReduceOp.AVG)
    return x + (mean - x.detach())


def average_gradients(params):
    """Under torchrun, every gradient becomes its mean over the ranks, by one all-reduce of them
    all flattened (StyleGAN2-ADA's and R3GAN's way): the ranks' optimizers then step alike."""
    if not torch.distributed.is_initialized():
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.AVG)
    for g, f in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(f.view_as(g))


def any_rank(flag, device):
    """Whether flag is set on any rank (a collective: every rank asks at the same step)."""
    if not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


# -----------------------------------------------------------------------------
# the networks and optimizers; the training step (seed 001): styles and fakes once, D's update,
# then G's, E's and F's together


def g_down(cfg, size):
    """--g_down, or by default 1 (StarGAN v2's 16x16 bottleneck at 256 px, 32x32 latents) where
    a halving leaves at least 8x8, else 0: through a 4x4 bottleneck G's source path loses the
    pose, which G then takes from the style (docs/pose.md). One line for too many halvings."""
    n = cfg["g_down"] if cfg["g_down"] is not None else int(size >= 16)
    if n > cfg["g_blocks"] // 2:
        die(f"--g_down must be at most g_blocks/2 = {cfg['g_blocks'] // 2}, got {n}")
    return n


def build_models(cfg, shape, n_domains, device, ptdtype=torch.float32):
    """G, E, F, D for latents of shape (C, H, W), EMA copies of G, E, F, a fused Adam for G, E, F
    (F at its own lr), one for D, their GradScalers (float16 only): the dict a checkpoint saves."""
    C, H, _ = shape
    n_down = g_down(cfg, H)
    G = Generator(C, cfg["g_dim"], cfg["style_dim"], cfg["g_blocks"], n_down).to(device)
    E = StyleEncoder(C, H, cfg["style_dim"], n_domains, cfg["e_dim"]).to(device)
    Fm = MappingNetwork(
        cfg["latent_dim"], cfg["style_dim"], n_domains, cfg["f_dim"], cfg["f_shared"]
    ).to(device)
    D = Discriminator(C, H, n_domains, cfg["d_dim"]).to(device)
    adam = dict(betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"], fused=True)
    groups = [{"params": list(G.parameters()) + list(E.parameters()), "lr": cfg["lr"]}]
    groups.append({"params": list(Fm.parameters()), "lr": cfg["f_lr"]})
    modules = dict(G=G, E=E, F=Fm, D=D)
    for k, m in (("G", G), ("E", E), ("F", Fm)):
        modules[f"{k}_ema"] = copy.deepcopy(m).eval()
    modules.update(opt_G=torch.optim.Adam(groups, **adam))
    modules.update(opt_D=torch.optim.Adam(D.parameters(), lr=cfg["lr"], **adam))
    for k in ("scaler_G", "scaler_D"):
        modules[k] = torch.amp.GradScaler(device.type, enabled=(ptdtype == torch.float16))
    return modules


def load_data(cfg, device, main_rank):
    """The latents file, every latent on the device, scaled once, and its split: (meta, the
    held-out indices, draw_batch's pool: latents, labels, the training indices grouped by domain,
    each group's size and start). Sets cfg["g_down"]: the log and checkpoint say what it chose."""
    try:
        meta = load_latents(cfg["data"])
    except ValueError as e:
        die(f"--data {cfg['data']}: {e}")
    factor = float(meta.get("scaling_factor", cfg["latent_scale"]))
    if abs(cfg["latent_scale"] - factor) > 1e-6 and main_rank:
        print(
            f"warning: --latent_scale {cfg['latent_scale']} differs from the scaling_factor "
            f"{factor} of the VAE that made {cfg['data']}",
            file=sys.stderr,
        )
    latents = meta["latents"].float().mul_(cfg["latent_scale"]).to(device)
    labels = meta["labels"].long().to(device)
    cfg["g_down"] = g_down(cfg, latents.shape[2])
    train_idx, val_idx = split_domains(meta["labels"], len(meta["domains"]), cfg["val_fraction"])
    dom_count = torch.tensor([len(t) for t in train_idx], device=device)
    dom_start = torch.cumsum(dom_count, 0) - dom_count
    train_sorted = torch.cat(train_idx).to(device)  # grouped by domain: x_ref is drawn from a group
    views = None  # --e_views: the zoomed encodings, kept in float16 and scaled when drawn
    if cfg["e_views"] > 0:
        if meta.get("views") is None or meta["views"].shape[1] == 0:
            die(f"--e_views needs latents encoded with --zoom_views; {cfg['data']} has none")
        views = meta["views"].to(device, torch.float16)
    pool = (latents, labels, train_sorted, dom_count, dom_start, views)
    return meta, torch.cat(val_idx).to(device), pool


def draw_batch(cfg, pool, mine, ada):
    """One step's global batch, drawn alike on every rank (seed 001's step): sources, their
    domains, a target domain for each (uniform over the others), a reference of that domain, two
    z, E's views, ADA's draws and f_match's. Returns this rank's slice, `mine` (f_match's draws
    whole), as train_step takes it."""
    latents, labels, train_sorted, dom_count, dom_start, zoomed = pool
    B, K, (H, W), device = cfg["batch_size"], len(dom_count), latents.shape[2:], latents.device
    idx = train_sorted[torch.randint(len(train_sorted), (B,), device=device)]
    y_src = labels[idx]
    y_trg = (y_src + torch.randint(1, K, (B,), device=device)) % K  # uniform over the others

    def one_of(y):  # a training latent of each domain in y, uniform within it
        n = dom_count[y]
        pick = (torch.rand(len(y), device=device) * n).long().clamp_max(n - 1)
        return train_sorted[dom_start[y] + pick]

    ref = one_of(y_trg)  # a reference of the target domain
    z_trg, z_2 = torch.randn(2, B, cfg["latent_dim"], device=device)
    e_views = None  # x_ref's (first B) and content's: each with chance e_views, E sees one of
    if zoomed is not None:  # its image's zoomed encodings instead (then no latent zoom)
        k = torch.randint(zoomed.shape[1], (2 * B,), device=device)
        take = torch.rand(2 * B, device=device) < cfg["e_views"]  # drawn whole, gathered mine
        rows, k, take = (rank_rows(t, 2, mine) for t in (torch.cat([ref, idx]), k, take))
        e_views = (take[:, None, None, None], zoomed[rows, k].float() * cfg["latent_scale"])
    zoom = 0.0 if zoomed is not None else cfg["e_zoom"]
    views = None  # E's views of x_ref (first B) and content (next B); none when all are 0
    if cfg["e_flip"] or cfg["e_shift"] or zoom:
        views = random_views(2 * B, cfg["e_flip"], cfg["e_shift"], zoom, (H, W), device)
        views = rank_rows(views, 2, mine)
    pipes = [None, None]
    if ada is not None:  # ADA's draws for what D sees (x_ref and both fakes), in each step
        draws = (ada.draw(3 * B, (H, W)) for _ in range(2))
        pipes = [[rank_rows(t, 3, mine) for t in d] for d in draws]
    fm = None  # f_match's draws: F_MATCH_N training latents and z of every domain, alike on
    if cfg["w_f_match"] > 0:  # every rank (so N processes compute what one does)
        y_fm = torch.arange(K, device=device).repeat_interleave(F_MATCH_N)
        x_fm = latents[one_of(y_fm)]
        fm = (x_fm, torch.randn(K * F_MATCH_N, cfg["latent_dim"], device=device), y_fm)
    content, x_ref = latents[idx[mine]], latents[ref[mine]]
    e_in = None if e_views is None else torch.where(*e_views, torch.cat([x_ref, content]))
    return (content, y_src[mine], y_trg[mine], x_ref, z_trg[mine], z_2[mine], (e_in, views),
            *pipes, fm)  # fmt: skip


def train_step(cfg, nets, modules, batch, step, lam, ctx, w_id=None):
    """One step on this rank's slice of the batch: (content, y_src, y_trg, x_ref, z_trg, z_2,
    (E's inputs, E's views), the ADA pipe's draws for D's step and for G's step, f_match's
    (latents, z, domains); each None when off (E's inputs: --e_views)). nets: the G, E, F and
    D the step calls (compiled with --compile); R1's and R2's double backward goes through the
    raw D in modules (a compiled graph has none). Returns the tensors LOG_KEYS names: nothing is
    read back (no sync). lam: lambda_ds now; w_id: id's weight now (--id_decay_epochs), cfg's
    w_id when None."""
    G, E, Fm, D = nets
    opt_G, opt_D = modules["opt_G"], modules["opt_D"]
    scaler_G, scaler_D = modules["scaler_G"], modules["scaler_D"]
    content, y_src, y_trg, x_ref, z_trg, z_2, views, pipe_d, pipe_g, fm = batch
    zero, kind = content.new_zeros(()), cfg["adv_loss"]
    # styles and fakes, once, before D's update. Calls are batched along dim 0: G, E and D have
    # no batch-dependent layer (instance norm is per sample), so this computes what separate
    # calls compute. (D's spectral norm then takes one power-iteration step per batched call.)
    # ds's two draws: as in StarGAN v2, z_1 is the latent path's z_trg, so fake_1 is fake_lat.
    # E takes the styles of x_ref and content from moved views of them (--e_flip, --e_shift,
    # --e_zoom): a style then cannot say where things are, so cyc and id make G take the pose
    # from its source, and sty (E(fake_ref) against a style of a moved x_ref) makes E ignore it
    e_in, views = views
    e_in = torch.cat([x_ref, content]) if e_in is None else e_in  # --e_views: zoomed encodings
    e_in = e_in if views is None else view(e_in, views)
    with ctx:
        s_ref, s_src = E(e_in, torch.cat([y_trg, y_src])).chunk(2)
        s_lat, s_2 = Fm(torch.cat([z_trg, z_2]), torch.cat([y_trg, y_trg])).chunk(2)
        # stats' translation: the reference's style held, so stats trains G only (stats_loss);
        # with --stats_e, for --stats_max's extremes alone
        hold = cfg["w_stats"] > 0 and (not cfg["stats_e"] or cfg["stats_max"])
        held = [s_ref.detach()] if hold else []
        n = 3 + len(held)
        fake_ref, fake_lat, fake_2, *fake_held = G(
            content.repeat(n, 1, 1, 1), torch.cat([s_ref, s_lat, s_2, *held])
        ).chunk(n)

    # D step: the adversarial loss on both paths, averaged; R1 every r1_interval steps, compensated
    with ctx:
        d_in = augment(torch.cat([x_ref, fake_ref.detach(), fake_lat.detach()]), pipe_d)
        real_logits, fr_logits, fl_logits = D(d_in, y_trg.repeat(3)).float().chunk(3)
    d_loss = 0.5 * (
        d_adv_loss(kind, real_logits, fr_logits) + d_adv_loss(kind, real_logits, fl_logits)
    )
    r1 = r2 = zero
    D_raw = modules["D"]
    # R1 and R2 at the latents D saw (after ADA's pipe: for a mirror or a translation the same
    # penalty as through it, but for the border), autocast off, float32 (seed 001)
    real_seen, fakes_seen = d_in.detach().float().split([len(x_ref), 2 * len(x_ref)])
    if step % cfg["r1_interval"] == 0 and cfg["w_r2"] > 0:  # R1 and R2: one double backward
        with torch.autocast(device_type=content.device.type, enabled=False):
            r1, r2 = r1_r2_penalty(lambda x: D_raw(x, y_trg.repeat(3)), real_seen, fakes_seen)
        d_loss = d_loss + cfg["r1_interval"] * (cfg["w_r1"] * r1 + cfg["w_r2"] * r2)
    elif step % cfg["r1_interval"] == 0 and cfg["w_r1"] > 0:
        x_ref_r1 = real_seen.requires_grad_(True)
        with torch.autocast(device_type=content.device.type, enabled=False):
            r1 = r1_penalty(D_raw(x_ref_r1, y_trg), x_ref_r1)
        d_loss = d_loss + (cfg["w_r1"] * cfg["r1_interval"]) * r1
    opt_D.zero_grad(set_to_none=True)
    scaler_D.scale(d_loss).backward()
    average_gradients(opt_D.param_groups[0]["params"])  # torchrun: the ranks' mean, R1's in
    scaler_D.step(opt_D)
    scaler_D.update()

    # G step: G, E and F together, against the updated D
    with ctx:
        y2 = y_trg.repeat(2)
        if kind == "rpgan":  # each fake against the real reference of its row: its logit too
            d_in = augment(torch.cat([fake_ref, fake_lat, x_ref]), pipe_g)
            adv_ref, adv_lat, real_g = D(d_in, y_trg.repeat(3)).float().chunk(3)
        else:
            fakes_pipe = None if pipe_g is None else [t[: 2 * len(x_ref)] for t in pipe_g]
            d_in = augment(torch.cat([fake_ref, fake_lat]), fakes_pipe)
            adv_ref, adv_lat = D(d_in, y2).float().chunk(2)
            real_g = None
        g_adv = g_adv_loss(kind, adv_ref, real_g) + g_adv_loss(kind, adv_lat, real_g)
        s_ref_hat, s_lat_hat = E(torch.cat([fake_ref, fake_lat]), y2).float().chunk(2)
        sty = style_reconstruction_loss(s_ref_hat, s_ref.float())
        sty = sty + style_reconstruction_loss(s_lat_hat, s_lat.float())
        ds = diversity_sensitive_loss(fake_lat.float(), fake_2.float(), cfg["ds_margin"] or None)
        back = [fake_ref, fake_lat] + ([content] if cfg["w_id"] > 0 else [])  # cyc, id: one call
        outs = G(torch.cat(back), s_src.repeat(len(back), 1)).float().chunk(len(back))
        cyc = cycle_consistency_loss(outs[0], content) + cycle_consistency_loss(outs[1], content)
        idl = identity_loss(outs[2], content) if cfg["w_id"] > 0 else zero
    g_loss = cfg["w_adv"] * g_adv + cfg["w_sty"] * sty + cfg["w_cyc"] * cyc
    w_id = cfg["w_id"] if w_id is None else w_id
    g_loss = g_loss + w_id * idl - lam * ds
    struct = zero
    if cfg["w_struct"] > 0:  # both translations' layouts against their source's
        fakes = torch.cat([fake_ref, fake_lat]).float()
        struct = 2 * structure_loss(fakes, content.float().repeat(2, 1, 1, 1))
        g_loss = g_loss + cfg["w_struct"] * struct
    stats = f_match = zero
    if cfg["w_f_match"] > 0:  # F's styles of fresh z onto E's of real latents, every domain
        x_fm, z_fm, y_fm = fm
        with torch.no_grad(), ctx:
            s_e = E(x_fm, y_fm).float().view(-1, F_MATCH_N, cfg["style_dim"])
        with ctx:
            s_f = Fm(z_fm, y_fm).float().view(-1, F_MATCH_N, cfg["style_dim"])
        f_match = f_match_loss(s_f, s_e)
        g_loss = g_loss + cfg["w_f_match"] * f_match
    if cfg["w_stats"] > 0:
        fake_stats = fake_ref if cfg["stats_e"] else fake_held[0]
        stats = stats_loss(fake_stats, x_ref, fake_held[0] if cfg["stats_max"] else None)
        g_loss = g_loss + cfg["w_stats"] * stats
    gef_params = [p for group in opt_G.param_groups for p in group["params"]]
    opt_G.zero_grad(set_to_none=True)
    scaler_G.scale(g_loss).backward(inputs=gef_params)  # G's, E's, F's grads: D's not needed
    average_gradients(gef_params)
    scaler_G.step(opt_G)
    scaler_G.update()
    values = [d_loss, g_loss, g_adv, sty, ds, cyc, idl, struct, stats, f_match, r1, r2]
    values += [real_logits.mean(), torch.cat([fr_logits, fl_logits]).mean()]  # d_real, d_fake
    values.append(real_logits.sign().mean())  # ada_rt: this step's share of E[sign(D(x_ref))]
    return [v.detach() for v in values]


def update_ema(ema_pairs, step, ema):
    """The EMA copies one step on, with a warm-up: beta_t = min(ema, (1 + t) / (10 + t)), so early
    on the EMA follows the networks closely. ema_pairs: (EMA parameters, parameters) per network."""
    beta = min(ema, (1 + step) / (10 + step))
    with torch.no_grad():
        for p_ema, p in ema_pairs:
            torch._foreach_lerp_(p_ema, p, 1 - beta)


# -----------------------------------------------------------------------------
# the per-step meter, Ctrl-C


class Meter:
    """Per-step scalars, kept on the device (no host sync inside a step); flush() reads them back
    into the epoch's sums (plain floats: a checkpoint holds them) and the progress line's."""

    def __init__(self, keys, size, device, sums=None):
        self.keys, self.buf, self.steps = keys, torch.zeros(size, len(keys), device=device), []
        self.sums = sums  # this epoch's sums, one per key, or None before its first flush
        self.recent = np.zeros(len(keys) + 1)  # sums since the last progress line, and their count

    def push(self, step, values):
        self.buf[len(self.steps)] = torch.stack(values)
        self.steps.append(step)

    def flush(self):
        """Read the buffered rows back (a sync point) and add them up. Returns (step, keys) of the
        first non-finite row, or None. Under torchrun the rows are averaged over the ranks first."""
        if not self.steps:
            return None
        rows = self.buf[: len(self.steps)].double()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(rows, op=torch.distributed.ReduceOp.AVG)
        rows = rows.cpu().numpy()
        bad = ~np.isfinite(rows).all(1)
        if bad.any():
            i = int(np.argmax(bad))
            return self.steps[i], [k for k, v in zip(self.keys, rows[i]) if not np.isfinite(v)]
        s = rows.sum(0).tolist()
        self.sums = s if self.sums is None else [a + b for a, b in zip(self.sums, s)]
        self.recent = self.recent + np.append(s, len(rows))
        self.steps = []
        return None

    def take_recent(self):
        """The sums since the last call, and how many steps they cover."""
        sums, n = self.recent[:-1], int(self.recent[-1])
        self.recent = np.zeros(len(self.keys) + 1)
        return sums, n


def duration(seconds):
    """A time span in the units a person reads: 1h02m, 3m05s, 12s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def evals_left(epoch, last_epoch, interval):
    """How many evaluations the run still makes: every interval-th epoch from this one, the last."""
    if not interval:
        return 0
    return len({e for e in range(epoch, last_epoch + 1) if e % interval == 0} | {last_epoch})


def eta(steps_left, step_seconds, evals, eval_seconds):
    """The time the run still needs: its steps at the recent pace, and apart from them its
    evaluations at the last one's (before the first, not known yet)."""
    text = f"eta {duration(steps_left * step_seconds)}"
    if evals:
        took = f"~{duration(evals * eval_seconds)}" if eval_seconds is not None else "not timed yet"
        text += f" + {evals} evaluation{'s' * (evals > 1)} ({took})"
    return text


def run_length(steps, interval_seconds, n, first):
    """On the first progress line: how many steps the run takes, and about how long."""
    if not first:
        return ""
    return f" | this run: {steps} steps, about {duration(steps * interval_seconds / n)}"


def nan_message(bad, epoch, ckpt_path, saved_step, hint):
    step, keys = bad
    kept = "No checkpoint was written yet"
    if saved_step is not None:
        kept = f"The last good checkpoint is {ckpt_path} (step {saved_step})"
    return (
        f"non-finite {', '.join(keys)} at step {step + 1} (epoch {epoch}); stopped. {kept}; {hint}"
    )


class StepProfiler:
    """--profile N: torch.profiler over N steps, from `start` on. Writes profile.txt in out_dir
    (the ops by their own time; on a GPU by their kernels' time) and profile.json (a trace for
    ui.perfetto.dev or chrome://tracing), and prints where a step's time went: on a GPU, the
    share of it spent in kernels; the rest is launching them and host work."""

    def __init__(self, steps, start, total_steps, out_dir, device, active=True):
        """active: whether this process profiles and writes (rank 0 under torchrun)."""
        if steps and start + steps > total_steps:
            die(
                f"--profile {steps}: the profile starts after {WARMUP_STEPS} warm-up steps and "
                f"the run has {total_steps - start + WARMUP_STEPS} steps left; let it run at least "
                f"{start + steps} steps (--max_iters, --epochs)"
            )
        self.start, self.end, self.out_dir, self.device = start, start + steps, out_dir, device
        self.active, self.prof, self.t0 = active, None, 0.0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, step):
        """Called after each step with the number of steps done."""
        if step == self.start and self.end > self.start and self.active:
            acts = [torch.profiler.ProfilerActivity.CPU]
            acts += [torch.profiler.ProfilerActivity.CUDA] * (self.device.type == "cuda")
            self.sync()
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif step == self.end and self.prof is not None:
            self.sync()
            wall = (time.perf_counter() - self.t0) / (self.end - self.start)
            self.prof.__exit__(None, None, None)
            table_path = os.path.join(self.out_dir, "profile.txt")
            trace_path = os.path.join(self.out_dir, "profile.json")
            ops = self.prof.key_averages()
            on_gpu = self.device.type == "cuda"
            sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
            with open(table_path, "w") as f:
                f.write(ops.table(sort_by=sort, row_limit=40))
            self.prof.export_chrome_trace(trace_path)
            line = f"profile: steps {self.start}..{self.end}, {wall * 1e3:.2f} ms a step"
            if on_gpu:  # the kernels' own time, summed over the GPU's events
                cuda = torch.autograd.DeviceType.CUDA
                kernels = sum(e.self_device_time_total for e in ops if e.device_type == cuda)
                kernels = kernels / 1e3 / (self.end - self.start)  # us in all -> ms a step
                line += f", {kernels:.2f} ms of it in GPU kernels ({kernels / wall / 10:.0f}%)"
            print(f"{line}; the ops in {table_path}, the trace in {trace_path}", flush=True)
            self.prof = None


class CtrlC:
    """The SIGINT handler: the step in progress finishes, a checkpoint is saved and the run stops.
    A second Ctrl-C stops at once, except under torchrun, whose agent repeats the signal."""

    def __init__(self):
        self.pressed = False
        signal.signal(signal.SIGINT, self)

    def __call__(self, signum, frame):
        self.pressed = True
        if "RANK" not in os.environ:
            signal.signal(signal.SIGINT, signal.default_int_handler)


# -----------------------------------------------------------------------------
# --translate: your own images through a trained run. The image code is encode_latents.py's.

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TRANSLATE_BATCH = 16  # images a pass: read, encode, G, decode and write, then the next
GRID_ROWS, GRID_COLS = 16, 16  # grid.png: at most this many sources, and styles or references


def image_files(folder, relative_to):
    """The image files under folder, sub-folders included, sorted, as paths relative_to."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for n in sorted(names):
            if n.lower().endswith(IMAGE_EXTS) and not n.startswith("."):
                files.append(os.path.relpath(os.path.join(root, n), relative_to))
    return files


def to_square(img, size):
    """A PIL image -> uint8 (3, size, size): RGB, shorter side resized to size (bicubic), center
    crop. A big JPEG is decoded at a reduced scale first."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    if img.format == "JPEG" and scale < 0.5:  # the decoder skips what the resize would throw away
        img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        w, h = img.size
        scale = size / min(w, h)
    img = img.convert("RGB")
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class Items(torch.utils.data.Dataset):
    """Item i -> (uint8 (3, size, size), i, error message or ''). An unreadable image gives zeros
    and its error."""

    def __init__(self, items, root, size, idx_images=None):
        self.items, self.root, self.size, self.idx_images = items, root, size, idx_images

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path = self.items[i][0]
        try:
            if self.idx_images is not None:
                img = Image.fromarray(self.idx_images[int(path.rsplit("#", 1)[1])], mode="L")
            else:
                img = Image.open(os.path.join(self.root, path))
                img.load()
            return to_square(img, self.size), i, ""
        except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, ...)
            blank = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
            return blank, i, f"{type(e).__name__}: {e}"


def run_networks(cfg, ckpt, device):
    """G, E and F of a checkpoint (the EMA copies, as samples and evaluation use them), and what
    it knows of its data: domains, VAE, image size, latent shape."""
    meta = ckpt["data_meta"]
    C, H, _ = meta["latent_shape"]
    K = len(meta["domains"])
    G = Generator(C, cfg["g_dim"], cfg["style_dim"], cfg["g_blocks"], g_down(cfg, H))
    E = StyleEncoder(C, H, cfg["style_dim"], K, cfg["e_dim"])
    F_ = MappingNetwork(cfg["latent_dim"], cfg["style_dim"], K, cfg["f_dim"], cfg["f_shared"])
    suffix = "_ema" if cfg["ema"] > 0 else ""
    for name, m in (("G", G), ("E", E), ("F", F_)):
        m.load_state_dict(ckpt[name + suffix])
    return [m.to(device).eval().requires_grad_(False) for m in (G, E, F_)], meta


def encoded_batches(vae, root, files, size, scale):
    """The image files under root in batches of TRANSLATE_BATCH: (uint8 images, their scaled
    latents, the files kept), preprocessed as encode_latents.py does; unreadable ones skipped."""
    items = Items([(f, 0) for f in files], root, size)
    for start in range(0, len(files), TRANSLATE_BATCH):
        imgs, kept = [], []
        for i in range(start, min(start + TRANSLATE_BATCH, len(files))):
            x, _, err = items[i]
            if err:
                print(f"warning: skipping {os.path.join(root, files[i])}: {err}", file=sys.stderr)
            else:
                imgs.append(x), kept.append(files[i])
        if kept:
            imgs = torch.stack(imgs)
            yield imgs, encode(vae, imgs, scale), kept


@torch.no_grad()
def encode(vae, imgs, scale):
    """Images (uint8) -> scaled latents: the VAE's latent_dist.mean, as encode_latents.py stores."""
    x = imgs.to(vae.device, vae.dtype) / 127.5 - 1
    chunks = [vae.encode(c).latent_dist.mean.float() for c in x.split(16)]
    return torch.cat(chunks) * scale


@torch.no_grad()
def decode(vae, latents, scale):
    """Scaled latents -> images in [-1, 1], through the VAE."""
    chunks = [vae.decode((c / scale).to(vae.dtype)).sample.float() for c in latents.split(16)]
    return torch.cat(chunks).clamp(-1, 1).cpu()


def translate(cfg, ckpt):
    """--translate SRC_DIR with a trained run: sources by reference (--ref, one reference folder
    per domain) or into --target with --n_styles styles of F; one PNG per source and reference
    or style, and grid.png with the sources down the rows."""
    device = torch.device(cfg["device"])
    (G, E, F_), meta = run_networks(cfg, ckpt, device)
    domains, size, scale = meta["domains"], meta["image_size"], cfg["latent_scale"]
    out = cfg["result_dir"] or os.path.join(cfg["out_dir"], "translations")
    if not os.path.isdir(cfg["translate"]):
        die(f"--translate {cfg['translate']}: no such folder")
    sources = image_files(cfg["translate"], cfg["translate"])
    if not sources:
        die(f"--translate {cfg['translate']}: no images ({' '.join(IMAGE_EXTS)}) in it")
    if cfg["ref"] is not None:
        if not os.path.isdir(cfg["ref"]):
            die(f"--ref {cfg['ref']}: no such folder")
        found = sorted(
            d for d in os.listdir(cfg["ref"]) if os.path.isdir(os.path.join(cfg["ref"], d))
        )
        unknown = [d for d in found if d not in domains]
        if unknown or not found:
            what = f"has domain folder {', '.join(unknown)}" if unknown else "has no domain folder"
            die(f"--ref {cfg['ref']} {what}; the run knows {', '.join(domains)}")
        refs = [(d, f) for d in found for f in image_files(os.path.join(cfg["ref"], d), cfg["ref"])]
        if not refs:
            die(f"--ref {cfg['ref']}: no images in its domain folders")
    elif cfg["target"] not in domains:
        die(f"--target {cfg['target']}: not a domain of the run, which knows {', '.join(domains)}")
    vae_name = cfg["vae"] or meta["vae"]
    if not vae_name:
        die("--translate: the run's latents file names no VAE; give one with --vae")
    try:
        vae_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        vae = load_vae(vae_name, None if cfg["vae"] else meta["subfolder"], device, vae_dtype)
    except ValueError as e:
        die(str(e))

    if cfg["ref"] is not None:  # a style per reference; the first GRID_COLS images for the grid
        styles, top, names = [], [], []
        for imgs, x, kept in encoded_batches(vae, cfg["ref"], [f for _, f in refs], size, scale):
            labels = torch.tensor([domains.index(f.split(os.sep)[0]) for f in kept], device=device)
            styles.append(E(x, labels))
            top += list(imgs[: GRID_COLS - len(top)].float() / 127.5 - 1)
            names += [f"{f.split(os.sep)[0]}_{stem(f.split(os.sep, 1)[1])}" for f in kept]
        if not styles:
            die(f"--translate: no readable image in {cfg['ref']}")
        styles = torch.cat(styles)
    else:
        gen = torch.Generator().manual_seed(cfg["seed"])
        z = torch.randn(cfg["n_styles"], cfg["latent_dim"], generator=gen).to(device)
        y = torch.full((cfg["n_styles"],), domains.index(cfg["target"]), device=device)
        styles = F_(z, y)
        names = [f"{cfg['target']}_style{k}" for k in range(cfg["n_styles"])]
    # the sources flow through in batches: read, encode, G, decode, PNG. Only the grid's first
    # GRID_ROWS sources x GRID_COLS styles are kept, so memory does not grow with the sources.
    os.makedirs(out, exist_ok=True)
    n, m, rows = 0, len(styles), []
    for imgs, x, kept in encoded_batches(vae, cfg["translate"], sources, size, scale):
        pairs = [(i, j) for i in range(len(x)) for j in range(m)]  # (source, style)
        for c in range(0, len(pairs), TRANSLATE_BATCH):
            i, j = (torch.tensor(v) for v in zip(*pairs[c : c + TRANSLATE_BATCH]))
            with torch.no_grad():
                fakes = decode(vae, G(x[i.to(device)], styles[j.to(device)]), scale)
            for a, b, img in zip(i.tolist(), j.tolist(), fakes):
                path = os.path.join(out, f"{stem(kept[a])}__{names[b]}.png")
                save_grid(img[None], path, 1, pad=0)
                if n + a < GRID_ROWS and b < GRID_COLS:
                    if b == 0:
                        rows.append([imgs[a].float() / 127.5 - 1])  # the source, first
                    rows[n + a].append(img)
        n += len(kept)
    if not n:
        die(f"--translate: no readable image in {cfg['translate']}")
    # the grid: sources down the first column, translations across, references along the top
    if cfg["ref"] is not None:
        rows.insert(0, [torch.full_like(top[0], -1)] + top)
    cells = torch.stack([img for row in rows for img in row])
    save_grid(cells, os.path.join(out, "grid.png"), nrow=min(m, GRID_COLS) + 1)
    shown = "all"
    if max(n - GRID_ROWS, m - GRID_COLS) > 0:
        shown = f"the first {min(n, GRID_ROWS)} x {min(m, GRID_COLS)}"
    print(
        f"translated {n} images x {m} {'references' if cfg['ref'] else 'styles'} into {out} "
        f"({n * m} PNGs, and grid.png with {shown})"
    )


def stem(path):
    """A file's path without its extension, sub-folders joined by '_': a name for its output."""
    return os.path.splitext(path)[0].replace(os.sep, "_")


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg, ckpt = parse_config(argv)
    if cfg["translate"]:
        return translate(cfg, ckpt)
    B = cfg["batch_size"]  # the global batch; this rank computes its slice `mine`
    # various inits, derived attributes, I/O setup
    rank, world, device = init_distributed(torch.device(cfg["device"]))
    mine, main_rank = slice(rank * B // world, (rank + 1) * B // world), rank == 0
    torch.manual_seed(cfg["seed"])  # the same on every rank: the same global draws
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convolutions on Ampere+
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = device.type == "cuda"
    ptdtype = getattr(torch, cfg["dtype"])  # float32, bfloat16 or float16
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device.type, ptdtype)
    out_dir = cfg["out_dir"]
    samples_dir = os.path.join(out_dir, "samples")
    os.makedirs(samples_dir, exist_ok=True)
    log_path, ckpt_path = os.path.join(out_dir, "log.json"), os.path.join(out_dir, "ckpt.pt")

    # data: every latent on the device, scaled once (seed 001: content * latent_scale, x_ref too)
    meta, val_idx, pool = load_data(cfg, device, main_rank)
    latents, labels, train_sorted = pool[:3]
    domains, K, (C, H, W) = list(meta["domains"]), len(meta["domains"]), latents.shape[1:]
    data_meta = {k: meta.get(k) for k in ("vae", "subfolder", "image_size")}  # for --translate
    data_meta.update(domains=domains, latent_shape=[C, H, W])
    n_train, steps_per_epoch = len(train_sorted), cfg["epoch_size"] // B

    # model init, the EMA copies of G, E and F for samples and evaluation, the optimizers
    modules = build_models(cfg, (C, H, W), K, device, ptdtype)
    G, E, Fm, D = (modules[k] for k in "GEFD")
    nets, emas = [G, E, Fm], [modules[k + "_ema"] for k in "GEF"]
    ema_pairs = [(list(m_ema.parameters()), list(m.parameters())) for m, m_ema in zip(nets, emas)]

    # where the run stands, fresh or from the checkpoint
    step, epoch, sums, elapsed, records = 0, 1, None, 0.0, []
    if ckpt is not None:
        step, epoch, sums, elapsed, records = resume(cfg, ckpt, modules, device, main_rank)
    log = {"script": SCRIPT, "config": cfg, "records": records}
    total_steps = cfg["epochs"] * steps_per_epoch
    if cfg["max_iters"]:
        total_steps = min(total_steps, cfg["max_iters"])
    profiler = StepProfiler(
        cfg["profile"], step + WARMUP_STEPS, total_steps, out_dir, device, main_rank
    )

    # compile: keep the raw modules for checkpoints, EMA, samples and R1's double backward
    G_c, E_c, F_c, D_c = G, E, Fm, D
    if cfg["compile"]:
        G_c, E_c, F_c, D_c = (torch.compile(m, dynamic=False) for m in (G, E, Fm, D))

    # samples: decoded through the VAE the latents file names, if it loads; evaluation; the meter
    vae = samples_vae(cfg, meta, device) if main_rank else None
    grids = SampleGrids(cfg, latents, labels, K, val_idx if len(val_idx) else train_sorted, vae)
    evaluator = TranslationEvaluator(cfg, meta, latents, labels, train_sorted, val_idx, ctx)
    shown = emas if cfg["ema"] > 0 else nets  # the networks samples and evaluation use
    meter = Meter(LOG_KEYS, cfg["log_interval"], device, sums)
    ada = None  # ADA: on with --ada_target or --ada_p, its state in the checkpoint
    if cfg["ada_target"] is not None or cfg["ada_p"] is not None:
        ada = AdaptiveAugment(cfg, device, ckpt.get("ada") if ckpt is not None else None)
    ctrl_c = CtrlC()

    if main_rank:
        print(
            f"{', '.join(domains)}: {n_train} training and {len(val_idx)} held-out latents "
            f"{C}x{H}x{W}, {steps_per_epoch} steps/epoch, {total_steps} steps, device {device} "
            f"{cfg['dtype']}{' compiled' * cfg['compile']}"
        )
    saved_step = step if ckpt is not None else None
    # the final throughput leaves out the warm-up (compiling) and the profiled steps
    start_step, bench_start = step, profiler.end
    last_epoch, eval_seconds, start = math.ceil(total_steps / steps_per_epoch), None, True
    t_start = time.perf_counter()
    t_interval = t_epoch = t_start  # start of the progress interval, and of the epoch's timed part
    bench_t0, paused = None, 0.0  # the final throughput: from bench_start, less checkpoint time
    while step < total_steps:
        # -------------------------------------------------------------------------------------
        # one training step (seed 001)
        lam = lambda_ds(epoch, cfg["w_ds"], cfg["ds_decay_epochs"])
        w_id = lambda_ds(epoch, cfg["w_id"], cfg["id_decay_epochs"])  # the same schedule
        batch = draw_batch(cfg, pool, mine, ada)
        values = train_step(cfg, (G_c, E_c, F_c, D_c), modules, batch, step, lam, ctx, w_id)
        meter.push(step, values)
        if cfg["ema"] > 0:
            update_ema(ema_pairs, step, cfg["ema"])
        step += 1
        if ada is not None:
            ada.step(values[-1], step)
        profiler(step)

        # -------------------------------------------------------------------------------------
        # read the meter back (a sync) only where it is needed: progress, epoch end, the timing
        end_of_epoch = step % steps_per_epoch == 0
        sync = step % cfg["log_interval"] == 0 or end_of_epoch or step in (total_steps, bench_start)
        # Ctrl-C: at once in one process; under torchrun, where the ranks meet, so all stop alike
        stop = ctrl_c.pressed if world == 1 else sync and any_rank(ctrl_c.pressed, device)
        last_step = step == total_steps or stop
        if sync or last_step:
            bad = meter.flush()
            if bad:
                die(nan_message(bad, epoch, ckpt_path, saved_step, "lower --lr or raise --w_r1"))
        if step == bench_start:  # the clock starts after the warm-up's work is done
            bench_t0, paused = time.perf_counter(), 0.0
        if step % cfg["log_interval"] == 0 and main_rank:
            now = time.perf_counter()
            s, n = meter.take_recent()
            means = " ".join(f"{k} {v:.4f}" for k, v in zip(LOG_KEYS, s / max(n, 1)))
            left = evals_left(epoch, last_epoch, cfg["eval_interval"])
            time_left = eta(total_steps - step, (now - t_interval) / n, left, eval_seconds)
            print(
                f"epoch {epoch}/{cfg['epochs']} step {step}/{total_steps} | {means} | lambda_ds "
                f"{lam:.3f} | {n * B / (now - t_interval):.0f} img/s | {time_left}"
                f"{run_length(total_steps - start_step, now - t_interval, n, start)}",
                flush=True,
            )
        if step % cfg["log_interval"] == 0:
            t_interval, start = time.perf_counter(), False
        if end_of_epoch or last_step:  # the epoch's record, evaluation, samples, the checkpoint
            t0 = time.perf_counter()
            if main_rank:  # rank 0 alone writes files and evaluates; the others wait for it
                epoch_start = (epoch - 1) * steps_per_epoch
                record = {"epoch": epoch, "step": step, "lambda_ds": lam}
                record["ada_p"] = float(ada.p) if ada is not None else 0.0
                record.update({k: v / (step - epoch_start) for k, v in zip(LOG_KEYS, meter.sums)})
                imgs = (step - max(epoch_start, start_step)) * B
                record["imgs_per_sec"] = imgs / max(t0 - t_epoch, 1e-9)
                record["time"] = elapsed + t0 - t_start
                if not end_of_epoch:
                    record["partial"] = True  # the epoch goes on after a resume, which replaces it
                at_eval = end_of_epoch and epoch % max(cfg["eval_interval"], 1) == 0
                for net in shown:
                    net.eval()
                if cfg["eval_interval"] and (step == total_steps or at_eval):
                    t_eval = time.perf_counter()
                    record.update(evaluator(*shown, epoch))  # evaluation figures join the record
                    eval_seconds = time.perf_counter() - t_eval
                    if not any("clf_acc" in r for r in log["records"]):
                        record.update(evaluator.reference)  # what real data reads: once per log
                log["records"].append(record)
                save_json_atomic(log, log_path)
                tag = f"epoch{epoch:03d}" if end_of_epoch else f"step{step:06d}"
                grids.save(*shown, ctx, os.path.join(samples_dir, f"{tag}.png"))
                for net in nets:
                    net.train()
            if end_of_epoch:
                epoch, meter.sums = epoch + 1, None
            if ada is not None:
                ada.share()
            if main_rank:
                run = dict(step=step, epoch=epoch, elapsed=elapsed + time.perf_counter() - t_start)
                run.update(sums=meter.sums, data_meta=data_meta)
                run["ada"] = ada.state() if ada is not None else None
                save_torch_atomic(checkpoint(cfg, run, modules, device), ckpt_path)
            if world > 1:
                torch.distributed.barrier()
            saved_step = step
            t1 = time.perf_counter()
            paused, t_interval, t_epoch = paused + t1 - t0, t_interval + t1 - t0, t1
        if last_step:
            break

    # -----------------------------------------------------------------------------------------
    if device.type == "cuda":
        torch.cuda.synchronize()
    if bench_t0 is not None:
        rate = (step - bench_start) * B / (time.perf_counter() - bench_t0 - paused)
    if world > 1:
        torch.distributed.destroy_process_group()
    if not main_rank:
        return
    if step < total_steps:
        print(
            f"interrupted at step {step}: checkpoint saved to {ckpt_path}; continue with --resume "
            f"--out_dir {out_dir}"
        )
    else:
        print(f"done: {step} steps; samples in {samples_dir}; log in {log_path}")
    if bench_t0 is not None and step > bench_start:
        print(f"{SCRIPT}: {rate:.1f} img/s (steps {bench_start}..{step}, training loop only)")


if __name__ == "__main__":
    main()
