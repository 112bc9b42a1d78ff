"""
Seed 004's MNIST GAN (an MLP generator and discriminator), with every adversarial loss of the seeds.

    python train_mnist_gan.py                                   # seed 004: bce, 200 epochs
    python train_mnist_gan.py --dataset fashion --loss wgan-gp  # Fashion-MNIST, WGAN-GP
    python train_mnist_gan.py --resume --out_dir out/mnist_gan  # continue exactly where it stopped
    python plot_losses.py out/mnist_gan/log.json                # the curves, and what they mean
    python train_mnist_gan.py --dataset fashion --max_iters 20 --eval_interval 0  # smoke, seconds

Losses (--loss), all computed from logits (D returns logits, never probabilities):
    bce      seed 004: d = (BCE(D(x),1) + BCE(D(G(z)),0)) / 2, non-saturating g = BCE(D(G(z)),1)
    minimax  seeds 000/003: the same d, saturating g = E[log(1 - D(G(z)))], the minimax game
    wgan     Arjovsky et al.: d = E[D(G(z))] - E[D(x)], g = -E[D(G(z))], weights clipped
    wgan-gp  Gulrajani et al.: the WGAN losses + lambda_gp * E[(||grad D(x_hat)|| - 1)^2]
    hinge    d = E[relu(1 - D(x))] + E[relu(1 + D(G(z)))], g = -E[D(G(z))]
    lsgan    Mao et al.: d = E[(D(x)-1)^2]/2 + E[D(G(z))^2]/2, g = E[(D(G(z))-1)^2]/2
--r1 GAMMA adds Mescheder et al.'s R1 penalty (GAMMA/2) * E[||grad_x D(x)||^2] on real data.

Output in --out_dir: log.json (per-epoch means, see plot_losses.py), samples/*.png (a 5x5 grid
from one fixed z), ckpt.pt (everything --resume needs). The last line printed is the throughput.
--profile N adds profile.txt and profile.json: where N steps' time went (torch.profiler).
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import signal
import struct
import sys
import time
import urllib.request
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SCRIPT = "train_mnist_gan.py"
WARMUP_STEPS = 10  # steps left out of the final throughput (torch.compile compiles in the first)
LOSSES = ("bce", "minimax", "wgan", "wgan-gp", "hinge", "lsgan", "rpgan")
# fmt: off
LOSS_DEFAULTS = {  # per loss: seed 004, the loss's paper (Algorithm 1 for WGAN and WGAN-GP), SAGAN,
    # R3GAN (rpgan, with its R1 + R2: r1 = r2 = gamma, measured on Fashion-MNIST, docs/mnist_gan.md)
    "bce":     dict(optimizer="adam", lr=2e-4, lr_d=2e-4, b1=0.5, b2=0.999, n_critic=1),
    "minimax": dict(optimizer="adam", lr=2e-4, lr_d=2e-4, b1=0.5, b2=0.999, n_critic=1),
    "wgan":    dict(optimizer="rmsprop", lr=5e-5, lr_d=5e-5, b1=0.0, b2=0.0, n_critic=5),
    "wgan-gp": dict(optimizer="adam", lr=1e-4, lr_d=1e-4, b1=0.0, b2=0.9, n_critic=5),
    "hinge":   dict(optimizer="adam", lr=1e-4, lr_d=4e-4, b1=0.0, b2=0.9, n_critic=1),  # TTUR
    "lsgan":   dict(optimizer="adam", lr=2e-4, lr_d=2e-4, b1=0.5, b2=0.999, n_critic=1),
    "rpgan":   dict(optimizer="adam", lr=2e-4, lr_d=2e-4, b1=0.0, b2=0.99, n_critic=1, r1=10,
                    r2=10),
}
# fmt: on
FIXED = ("dataset", "latent_dim", "loss", "batch_size")  # a resumed run cannot change these
SYSTEM = ("device", "dtype", "compile", "cuda_graph", "profile")  # never from a checkpoint

# -----------------------------------------------------------------------------
# flags: every knob of a run, grouped, each with where its default comes from


def build_parser():
    table = "; ".join(
        f"{k}: " + ", ".join(f"{a} {b:g}" if a != "optimizer" else b for a, b in v.items())
        for k, v in LOSS_DEFAULTS.items()
    )
    p = ArgParser(
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Defaults that depend on --loss: {table}.",
    )
    # fmt: off
    # data
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist",
                   help="MNIST or Fashion-MNIST (default mnist)")
    p.add_argument("--data_dir", default=None,
                   help="the four IDX files, raw or .gz (default data/<dataset>); missing ones are "
                        "downloaded, MD5 checked")
    p.add_argument("--mirror", default=None, help="base URL of the IDX .gz files to download")
    # model and loss
    p.add_argument("--latent_dim", type=positive_int, default=100, help="size of z (seed 004: 100)")
    p.add_argument("--loss", choices=LOSSES, default="bce", help="adversarial loss (seed 004: bce)")
    p.add_argument("--clip_value", type=positive_float, default=0.01,
                   help="wgan: D's weights are clipped to +-clip_value (WGAN paper: 0.01)")
    p.add_argument("--lambda_gp", type=nonneg_float, default=10.0,
                   help="wgan-gp: weight of the gradient penalty (WGAN-GP paper: 10)")
    p.add_argument("--r1", type=nonneg_float, default=None, metavar="GAMMA",
                   help="add (GAMMA/2) * R1 on real data to D's loss (default 0, rpgan's: 10)")
    p.add_argument("--r2", type=nonneg_float, default=None, metavar="GAMMA",
                   help="add (GAMMA/2) * R2, R1 on the fakes, to D's loss (default 0, rpgan's: 10)")
    p.add_argument("--gamma_end", type=nonneg_float, default=None,
                   help="decay --r1's and --r2's GAMMA to this over the run on a cosine, as R3GAN "
                        "does (default: constant)")
    p.add_argument("--n_critic", type=positive_int, default=None,
                   help="D steps per G step (default per loss: 1, or 5 for wgan and wgan-gp)")
    # optimization
    p.add_argument("--epochs", type=positive_int, default=200, help="passes (seed 004: 200)")
    p.add_argument("--max_iters", type=nonneg_int, default=0,
                   help="stop after this many steps in all (a step is a D update; 0: no limit)")
    p.add_argument("--batch_size", type=positive_int, default=64, help="images per step (seed 004)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate of G, and of D where the loss's defaults use one rate "
                        "(default per loss; seed 004's bce: 2e-4)")
    p.add_argument("--lr_d", type=positive_float, default=None,
                   help="D's learning rate, apart from --lr (default: --lr; hinge: 4e-4, SAGAN)")
    p.add_argument("--b1", type=unit_float, default=None, help="Adam beta1 (per loss; bce: 0.5)")
    p.add_argument("--b2", type=unit_float, default=None, help="Adam beta2 (per loss; bce: 0.999)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    # I/O
    p.add_argument("--out_dir", default="out/mnist_gan", help="log.json, samples/, ckpt.pt")
    p.add_argument("--resume", action="store_true",
                   help="continue out_dir/ckpt.pt; the flags not typed take the checkpoint's")
    p.add_argument("--log_interval", type=positive_int, default=100,
                   help="a progress line every this many steps")
    p.add_argument("--sample_interval", type=positive_int, default=400,
                   help="a 5x5 sample grid every this many steps (seed 004: 400)")
    # evaluation
    p.add_argument("--eval_interval", type=nonneg_int, default=10,
                   help="evaluate every this many epochs and at the end (0: never)")
    p.add_argument("--eval_samples", type=at_least_2, default=10000,
                   help="generated images per evaluation (default 10000)")
    p.add_argument("--mode_share", type=share, default=0.02,
                   help="a class is covered (modes) with this share of the samples (uniform: 0.1)")
    p.add_argument("--min_clf_acc", type=float, default=0.8,
                   help="warn when the evaluation classifier's test accuracy is below this")
    # system
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, cuda:1, cpu, ...")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="autocast dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile G and D (default: on for CUDA, off for CPU)")
    p.add_argument("--cuda_graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the whole step from a CUDA graph (default: on for CUDA, except "
                        "with --gamma_end)")
    p.add_argument("--profile", type=nonneg_int, default=0, metavar="N",
                   help="profile N steps after the warm-up: out_dir/profile.txt and profile.json")
    # fmt: on
    return p


def parse_config(argv=None):
    """The run's config, every flag's value (the log records it), and the checkpoint to resume."""
    cfg, typed = parse_flags(build_parser(), argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        die(
            "it runs in one process only (seed 004's whole schedule fits one GPU): start it "
            "with python, not torchrun"
        )
    ckpt = load_checkpoint(cfg["out_dir"]) if cfg["resume"] else None
    if ckpt is not None:  # the flags not typed take the checkpoint's values
        kept = {k: v for k, v in ckpt["config"].items() if k not in SYSTEM}
        cfg = {**cfg, **kept, **{k: cfg[k] for k in typed}}
    defaults = {"r1": 0.0, "r2": 0.0, **LOSS_DEFAULTS[cfg["loss"]]}
    cfg |= {k: v for k, v in defaults.items() if cfg.get(k) is None}
    if defaults["lr_d"] == defaults["lr"] and "lr_d" not in typed:  # seed 004: one rate for both
        cfg["lr_d"] = cfg["lr"]
    cfg["data_dir"] = cfg["data_dir"] or os.path.join("data", cfg["dataset"])
    if ckpt is not None:
        check_resume(cfg, ckpt, FIXED, SYSTEM)
        for k in ("r1", "r2"):  # a penalty turned on or off changes what the epoch's sums hold
            old = ckpt["config"].get(k) or 0.0
            if ckpt["sums"] is not None and (cfg[k] > 0) != (old > 0):
                die(
                    f"--resume: --{k} {cfg[k]:g} turns {k.upper()} {'on' if cfg[k] else 'off'} "
                    f"inside an epoch that the checkpoint began with --{k} {old:g}; finish that "
                    "epoch first"
                )
    if cfg["batch_size"] < 2:
        die("--batch_size must be at least 2 (the generator's BatchNorm needs 2 samples)")
    cfg |= system_config(cfg)
    capturable = cfg["device"].startswith("cuda") and cfg["gamma_end"] is None  # not a schedule
    if cfg["cuda_graph"] and not capturable:
        die("--cuda_graph needs a CUDA device and no --gamma_end; leave it off (--no-cuda_graph)")
    cfg["cuda_graph"] = capturable if cfg["cuda_graph"] is None else cfg["cuda_graph"]
    return cfg, ckpt


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


def share(text):
    return check(text, float, lambda v: 0 < v <= 1, "a share in (0, 1]")


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
# data: the four IDX files, downloaded from the official mirrors and checked against their MD5s

# fmt: off
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATASETS = {
    "mnist": dict(
        mirrors=["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
        md5=["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
             "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"],
        local_dirs=["MNIST/raw"],  # where torchvision (and so seed 004's script) keeps its copy
    ),
    "fashion": dict(
        mirrors=["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                 "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"],
        md5=["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
             "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"],
        local_dirs=["FashionMNIST/raw", "/usr/share/datasets/fashion-mnist"],  # torchvision, Debian
    ),
}
# fmt: on


def read_idx(path):
    """An IDX file (raw or .gz) as a uint8 numpy array: (N, rows, cols) for images, (N,) for labels.
    Raises ValueError with a message a person can act on when it is not a complete IDX file."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # a broken gzip: BadGzipFile (an OSError) or EOFError
        raise ValueError(
            f"{path}: cannot be read ({e}); delete it so it is downloaded again"
        ) from None
    if len(raw) < 8:
        raise ValueError(
            f"{path}: {len(raw)} bytes, too short for an IDX header; download it again"
        )
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        raise ValueError(
            f"{path}: bad magic number 0x{int.from_bytes(raw[:4], 'big'):08x} (expected "
            "0x00000801 for labels or 0x00000803 for images): not an IDX file"
        )
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != math.prod(dims):
        raise ValueError(
            f"{path}: header says {'x'.join(map(str, dims))} = {math.prod(dims)} bytes of data, "
            f"file has {len(body)}: truncated or corrupt; delete it and download it again"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def download(name, md5, folder, mirrors):
    """Fetch one file from the first mirror that serves it, check its MD5, move it into place."""
    os.makedirs(folder, exist_ok=True)
    dest, errors = os.path.join(folder, name), []
    for mirror in mirrors:
        url, tmp = mirror.rstrip("/") + "/" + name, dest + ".part"
        try:
            print(f"downloading {url}", flush=True)
            with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
                f.write(r.read())
            got = hashlib.md5(open(tmp, "rb").read()).hexdigest()
            if got != md5:
                raise ValueError(f"MD5 {got}, expected {md5}")
            os.replace(tmp, dest)
            return dest
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
            errors.append(f"{url}: {e}")
            if os.path.exists(tmp):
                os.remove(tmp)
    raise ValueError("; ".join(errors))


def find_idx(dataset, data_dir, mirrors=None):
    """Paths of the four IDX files: in data_dir (raw or .gz), the usual copies, or downloaded."""
    spec = DATASETS[dataset]
    for folder in [data_dir] + [os.path.join(data_dir, d) for d in spec["local_dirs"]]:
        names = [[os.path.join(folder, n + ".gz"), os.path.join(folder, n)] for n in IDX_FILES]
        found = [next((p for p in pair if os.path.exists(p)), None) for pair in names]
        if all(found):
            return found
    try:
        pairs = zip(IDX_FILES, spec["md5"])
        return [download(n + ".gz", md5, data_dir, mirrors or spec["mirrors"]) for n, md5 in pairs]
    except ValueError as e:
        hint = " or use --dataset fashion" if dataset == "mnist" else ""
        raise ValueError(
            f"{dataset} not found in {data_dir} and the download failed ({e}). Put "
            f"{', '.join(n + '.gz' for n in IDX_FILES)} in {data_dir}{hint} (offline on "
            "Debian/Ubuntu: apt-get install dataset-fashion-mnist)"
        ) from None


def load_dataset(dataset, data_dir, mirrors=None):
    """(train_images, train_labels, test_images, test_labels) as uint8 arrays, shapes checked."""
    paths = find_idx(dataset, data_dir, mirrors)
    arrays = [read_idx(p) for p in paths]
    for p, a, rank in zip(paths, arrays, (3, 1, 3, 1)):
        if a.ndim != rank:
            what = "images (3-d)" if rank == 3 else "labels (1-d)"
            raise ValueError(f"{p}: a {a.ndim}-d IDX array where {what} belong")
    for i in (0, 2):
        if len(arrays[i]) != len(arrays[i + 1]):
            raise ValueError(
                f"{paths[i]} has {len(arrays[i])} images but {paths[i + 1]} has "
                f"{len(arrays[i + 1])} labels"
            )
    if arrays[0].shape[1:] != (28, 28) or arrays[2].shape[1:] != (28, 28):
        sizes = " and ".join("x".join(map(str, a.shape[1:])) for a in arrays[::2])
        raise ValueError(f"expected 28x28 images, the IDX files hold {sizes}")
    return arrays


def to_device(imgs, device):
    """uint8 (N, 28, 28) -> (N, 784) in [-1, 1] on the device: seed 004's Normalize(0.5, 0.5)."""
    x = torch.from_numpy(imgs.copy()).to(device).view(len(imgs), -1)
    return x.float().div_(127.5).sub_(1)


# -----------------------------------------------------------------------------
# models: seed 004's MLPs. D returns logits; probabilities, where shown, are sigmoid(logits).


class MLPGenerator(nn.Module):
    def __init__(self, latent_dim=100, img_shape=(1, 28, 28)):
        super().__init__()
        self.img_shape = img_shape

        def block(n_in, n_out, normalize=True):
            layers = [nn.Linear(n_in, n_out)]
            if normalize:
                # seed 004's BatchNorm1d(n_out, 0.8) calls 0.8 the momentum, but BatchNorm1d's
                # second positional argument is eps: it runs with eps=0.8 and momentum 0.1, as here
                layers.append(nn.BatchNorm1d(n_out, eps=0.8))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        layers = block(latent_dim, 128, normalize=False) + block(128, 256) + block(256, 512)
        layers += block(512, 1024) + [nn.Linear(1024, math.prod(img_shape)), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, z):  # (B, latent_dim) -> (B, 1, 28, 28) in [-1, 1]
        return self.model(z).view(z.size(0), *self.img_shape)


class MLPDiscriminator(nn.Module):
    def __init__(self, img_shape=(1, 28, 28)):
        super().__init__()
        act = nn.LeakyReLU(0.2, inplace=True)
        # seed 004 ends in nn.Sigmoid(); we keep the logit (safe under autocast)
        self.model = nn.Sequential(
            nn.Linear(math.prod(img_shape), 512), act, nn.Linear(512, 256), act, nn.Linear(256, 1)
        )

    def forward(self, img):  # (B, ...) -> (B, 1) logits
        return self.model(img.flatten(1))


# -----------------------------------------------------------------------------
# losses: pure functions of logits, each returning a scalar tensor, checked by test_losses.py
# against the seeds' own formulas. softplus(-t) = -log sigmoid(t); softplus(t) = -log(1-sigmoid(t))


def d_loss_fn(loss, real_logits, fake_logits):
    """The discriminator's (critic's) loss, to be minimised. rpgan pairs the i-th real and fake."""
    if loss in ("bce", "minimax"):  # seed 004: (BCE(D(x), 1) + BCE(D(G(z)), 0)) / 2
        return (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()) / 2
    if loss in ("wgan", "wgan-gp"):  # the critic maximises E[D(x)] - E[D(G(z))]: minimise minus it
        return fake_logits.mean() - real_logits.mean()
    if loss == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    if loss == "lsgan":  # a=0 (fake), b=1 (real)
        return 0.5 * (real_logits - 1).pow(2).mean() + 0.5 * fake_logits.pow(2).mean()
    if loss == "rpgan":  # Huang et al. 2024 (R3GAN): E[f(D(G(z)) - D(x))], f = softplus, per pair
        return F.softplus(fake_logits - real_logits).mean()
    raise ValueError(f"unknown loss {loss!r}")


def g_loss_fn(loss, fake_logits, real_logits=None):
    """The generator's loss, to be minimised. Only rpgan reads the real logits (per pair)."""
    if loss == "bce":  # non-saturating: BCE(D(G(z)), 1) = -E[log D(G(z))]
        return F.softplus(-fake_logits).mean()
    if loss == "minimax":  # E[log(1 - D(G(z)))]: its gradient vanishes while D rejects the fakes
        return -F.softplus(fake_logits).mean()
    if loss in ("wgan", "wgan-gp", "hinge"):
        return -fake_logits.mean()
    if loss == "lsgan":  # c=1
        return 0.5 * (fake_logits - 1).pow(2).mean()
    if loss == "rpgan":  # E[f(D(x) - D(G(z)))]: G moves its fakes above their paired reals
        if real_logits is None:
            raise ValueError("rpgan's generator loss needs the real logits")
        return F.softplus(real_logits - fake_logits).mean()
    raise ValueError(f"unknown loss {loss!r}")


def gradient_penalty(D, real, fake):
    """WGAN-GP: E[(||grad_x_hat D(x_hat)||_2 - 1)^2], x_hat = eps*real + (1-eps)*fake, eps ~ U[0,1]
    per sample, the norm over all of a sample's dimensions, inside the differentiated loss. Seed
    002's snippet takes it at the fakes, over dim 1, after backward(): it never reaches a grad."""
    eps = torch.rand(real.size(0), *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    x_hat = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def r1_penalty(real_logits, real):
    """R1 (seed 001): mean over the batch of sum(grad^2), grad = d(sum of logits)/d(real).
    real must require grad."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def r1_r2_penalty(logits_of, real, fake):
    """R1 on real and R2 on the (detached) fakes, each seed 001's mean over its samples of
    sum(grad^2), from one double backward through D over both together: D has no
    batch-dependent layer, so one call computes what two compute. logits_of: x -> D's logits."""
    x = torch.cat([real, fake]).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(logits_of(x).sum(), x, create_graph=True)
    per_sample = grad.pow(2).flatten(1).sum(1)
    return per_sample[: len(real)].mean(), per_sample[len(real) :].mean()


def gamma_at(start, end, step, total):
    """R3GAN's schedule: the penalties' gamma from start to end on a cosine (end None: constant)."""
    if end is None:
        return start
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


def log_keys(cfg):
    """The per-step values a record holds, in the order the step computes them."""
    keys = ["d_loss", "g_loss", "d_real", "d_fake"] + ["gp"] * (cfg["loss"] == "wgan-gp")
    return keys + ["r1"] * (cfg["r1"] > 0) + ["r2"] * (cfg["r2"] > 0)


# -----------------------------------------------------------------------------
# G, D, optimizers; the training step: G's update, then D's on the same fakes (seed 004's order)


def build_models(cfg, device):
    """G, D and their optimizers: the dict a checkpoint saves. Fused Adam updates in one pass over
    the parameters (1.3x the whole step on 2 CPU cores); RMSprop for wgan, as its paper."""
    G, D = MLPGenerator(cfg["latent_dim"]).to(device), MLPDiscriminator().to(device)
    graph = dict(capturable=True) if cfg["cuda_graph"] else {}  # step counts kept on the GPU
    if cfg["optimizer"] == "rmsprop":
        opt, kwargs = torch.optim.RMSprop, graph
    else:
        opt, kwargs = torch.optim.Adam, dict(betas=(cfg["b1"], cfg["b2"]), fused=True, **graph)
    opt_G = opt(G.parameters(), lr=cfg["lr"], **kwargs)
    opt_D = opt(D.parameters(), lr=cfg["lr_d"], **kwargs)
    return dict(G=G, D=D, opt_G=opt_G, opt_D=opt_D)


def train_step(cfg, modules, G_c, D_c, real, z, step, total_steps, ctx):
    """One step on a batch of real images and noise: G steps on every n_critic-th step, D on every
    step. G_c and D_c are the networks it calls (compiled with --compile; the penalties use the raw
    D). Returns the tensors log_keys names, then whether G stepped: nothing read back (no sync)."""
    D, opt_G, opt_D = modules["D"], modules["opt_G"], modules["opt_D"]
    loss_name, B = cfg["loss"], len(real)
    g_step = step % cfg["n_critic"] == 0
    if g_step:
        with ctx:
            fake = G_c(z)
            if loss_name == "rpgan":  # its G loss pairs each fake with a real: both logits
                real_g, fake_g = D_c(torch.cat([real, fake.view(B, -1)])).float().chunk(2)
                g_loss = g_loss_fn(loss_name, fake_g, real_g)
            else:
                g_loss = g_loss_fn(loss_name, D_c(fake).float())
        opt_G.zero_grad(set_to_none=True)
        g_loss.backward(inputs=opt_G.param_groups[0]["params"])  # G's grads only, not D's
        opt_G.step()
    else:
        with torch.no_grad(), ctx:
            fake = G_c(z)
        g_loss = real.new_zeros(())
    fake = fake.detach().view(B, -1).to(real.dtype)
    with ctx:
        logits = D_c(torch.cat([real, fake])).float()  # real and fake in one pass: no BatchNorm
    real_logits, fake_logits = logits[:B], logits[B:]
    d_loss = d_loss_fn(loss_name, real_logits, fake_logits)
    probs = loss_name in ("bce", "minimax", "lsgan")  # D(x), D(G(z)) as probabilities, else scores
    stats = [(torch.sigmoid(t) if probs else t).mean() for t in (real_logits, fake_logits)]
    # penalties: autocast off, float32, through the raw D (a compiled graph has no double backward)
    if loss_name == "wgan-gp":
        gp = gradient_penalty(D, real, fake)
        d_loss = d_loss + cfg["lambda_gp"] * gp
        stats.append(gp)
    gammas = [gamma_at(cfg[k], cfg["gamma_end"], step, total_steps) for k in ("r1", "r2")]
    if cfg["r1"] > 0 and cfg["r2"] > 0:  # both in one double backward
        r1, r2 = r1_r2_penalty(D, real, fake)
        d_loss = d_loss + gammas[0] / 2 * r1 + gammas[1] / 2 * r2
        stats += [r1, r2]
    elif cfg["r1"] > 0 or cfg["r2"] > 0:  # one of them; R2 is the same penalty, on the fakes
        x, gamma = (real, gammas[0]) if cfg["r1"] > 0 else (fake, gammas[1])
        x = x.detach().requires_grad_(True)
        r = r1_penalty(D(x), x)
        d_loss = d_loss + gamma / 2 * r
        stats.append(r)
    opt_D.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_D.step()
    if loss_name == "wgan":  # weight clipping keeps the critic (roughly) Lipschitz
        with torch.no_grad():
            torch._foreach_clamp_min_(list(D.parameters()), -cfg["clip_value"])
            torch._foreach_clamp_max_(list(D.parameters()), cfg["clip_value"])
    # the logged d_loss is the whole objective D minimised, penalties included
    values = [d_loss, g_loss] + stats
    return [v.detach() for v in values] + [torch.full((), float(g_step), device=real.device)]


class GraphedStep:
    """--cuda_graph: the whole step captured in a CUDA graph and replayed, one graph per kind of
    step (G steps or not). At batch 64 the MLPs' step is a few hundred tiny kernels that cost more
    to launch from Python than to run. A kind's first WARMUP calls run as they are, on a side stream
    (torch.compile compiles there); the next is captured, then replayed. Inputs are copied into
    the graph's tensors; the outputs are the graph's, overwritten by the next replay."""

    WARMUP = 3

    def __init__(self, step_fn, n_critic):
        self.step_fn, self.n_critic, self.graphs, self.calls = step_fn, n_critic, {}, {}

    def __call__(self, real, z, step):
        kind = step % self.n_critic == 0  # whether G steps
        if kind not in self.graphs and self.calls.setdefault(kind, 0) < self.WARMUP:
            self.calls[kind] += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step_fn(real, z, step)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if kind not in self.graphs:
            graph, real_s, z_s = torch.cuda.CUDAGraph(), real.clone(), z.clone()
            with torch.cuda.graph(graph):
                out = self.step_fn(real_s, z_s, step)
            self.graphs[kind] = graph, real_s, z_s, out
        graph, real_s, z_s, out = self.graphs[kind]
        real_s.copy_(real)
        z_s.copy_(z)
        graph.replay()  # capturing ran nothing: the first replay is the captured step
        return out


# -----------------------------------------------------------------------------
# files: atomic writes, so an interrupted run never leaves half a file; grids without torchvision


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


def save_samples(G, z_fixed, ctx, path):
    """A 5x5 grid of G(z_fixed), BatchNorm on its running statistics (the batch does not matter)."""
    G.eval()
    with torch.no_grad(), ctx:
        imgs = G(z_fixed)
    G.train()
    save_grid(imgs, path, nrow=5, scale=2)


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


def load_records(log_path, step):
    """The records of an earlier log.json up to a checkpoint's step (the later ones are redone)."""
    if not os.path.exists(log_path):
        return []
    with open(log_path) as f:
        old = json.load(f)
    return [r for r in old.get("records", []) if r["step"] <= step and not r.get("partial")]


# -----------------------------------------------------------------------------
# evaluation: our own classifier, trained on the real training data, and figures in its feature
# space. These are not Inception FID/IS/KID: they compare runs of this project with each other.


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


def kid(f1, f2, n_subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance (Binkowski et al. 2018), near 0 for samples of one distribution:
    the unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets."""
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    rng, m, d = np.random.default_rng(seed), min(subset_size, len(f1), len(f2)), f1.shape[1]
    total = 0.0
    for _ in range(n_subsets):
        x, y = f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))
        total += within / (m * (m - 1)) - 2 * kxy.mean()
    return float(total / n_subsets)


def classifier_score(probs, eps=1e-12):
    """exp(E_x KL(p(y|x) || p(y))), the Inception Score's formula: 1 for one class (or no
    confidence), up to the number of classes for confident predictions spread over all of them."""
    p = np.asarray(probs, dtype=np.float64)
    py = p.mean(0, keepdims=True)
    return float(np.exp((p * (np.log(p + eps) - np.log(py + eps))).sum(1).mean()))


class Classifier(nn.Module):
    """A LeNet-sized CNN; its penultimate layer (128 ReLU features) is the evaluation's space."""

    def __init__(self, n_classes=10):
        super().__init__()
        conv = [nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)]
        conv += [nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
        self.features = nn.Sequential(*conv, nn.Linear(32 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, n_classes)

    def forward(self, x):  # (B, 784) in [-1, 1] -> features (B, 128), logits (B, 10)
        f = self.features(x.reshape(-1, 1, 28, 28))
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


class SampleEvaluator:
    """fd, kid, is, modes, kl_uniform and prdc of --eval_samples images of G, from one fixed z. The
    classifier is trained when first needed and cached in out_dir, keyed by the data; then
    `reference` holds what real data reads (the *_real figures) and its test accuracy (clf_acc)."""

    def __init__(self, cfg, arrays, data, device, ctx):
        self.cfg, self.arrays, self.data, self.device, self.ctx = cfg, arrays, data, device, ctx
        self.clf = None

    def setup(self):
        cfg, data, device = self.cfg, self.data, self.device
        _, train_y, test_x, test_y = self.arrays
        tag = b"".join(a.tobytes() for a in self.arrays) + b"Classifier 16-32-128"
        path = os.path.join(cfg["out_dir"], f"classifier_{hashlib.sha1(tag).hexdigest()[:16]}.pt")
        # a fixed slice held out from the classifier: what real images read in the samples' place
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).to(device)
        n_hold = min(cfg["eval_samples"], len(data) // 6)
        hold, fit = perm[:n_hold], perm[n_hold:]
        y = torch.from_numpy(train_y.astype(np.int64)).to(device)

        train = lambda: train_classifier(Classifier, data[fit], y[fit], device)  # noqa: E731
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.clf, took = cached_classifier(path, Classifier, train, device)
        self.f_test, p_test = embed(self.clf, to_device(test_x, device))
        acc = float((p_test.argmax(1) == test_y).mean())
        if took is not None:
            print(
                f"evaluation classifier: trained in {took:.0f}s on {len(fit)} images, test "
                f"accuracy {acc:.3f}; cached in {path}"
            )
        if acc < cfg["min_clf_acc"]:
            print(
                f"warning: the evaluation classifier's test accuracy is {acc:.3f} (< --min_clf_acc "
                f"{cfg['min_clf_acc']}): fd, kid, is and modes mean little with it",
                file=sys.stderr,
            )
        self.test = gaussian(self.f_test)
        f_ref, p_ref = embed(self.clf, data[hold])
        self.reference = {
            "clf_acc": acc,
            "fd_real": frechet_distance(*gaussian(f_ref), *self.test),
            "kid_real": kid(f_ref, self.f_test),
            "is_real": classifier_score(p_ref),
        }
        self.f_test_t = torch.from_numpy(self.f_test).float().to(device)  # prdc's, on the device
        real = prdc(self.f_test_t, torch.from_numpy(f_ref).float())
        self.reference.update({f"{k}_real": v for k, v in real.items()})

    def __call__(self, G, epoch):
        t0 = time.perf_counter()  # the first call's includes the classifier's set-up
        if self.clf is None:
            self.setup()
        cfg, device = self.cfg, self.device
        gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 2)  # not training's RNG
        G.eval()
        with torch.no_grad(), self.ctx:
            sizes = [len(c) for c in torch.arange(cfg["eval_samples"]).split(1000)]
            z = [torch.randn(n, cfg["latent_dim"], generator=gen, device=device) for n in sizes]
            imgs = torch.cat([G(zc).float().flatten(1) for zc in z])
        G.train()
        f, p = embed(self.clf, imgs)
        hist = np.bincount(p.argmax(1), minlength=10) / len(p)
        seen = hist[hist > 0]
        out = {
            "fd": frechet_distance(*gaussian(f), *self.test),
            "kid": kid(f, self.f_test),
            "is": classifier_score(p),
            "modes": int((hist >= cfg["mode_share"]).sum()),
            "kl_uniform": float((seen * np.log(seen * 10)).sum()),
        }
        out.update(prdc(self.f_test_t, torch.from_numpy(f).float()))
        ref = self.reference
        print(
            f"eval epoch {epoch}: fd {out['fd']:.3f} (real data {ref['fd_real']:.3f}) kid "
            f"{out['kid']:.4f} is {out['is']:.2f} (real data {ref['is_real']:.2f}) modes "
            f"{out['modes']}/10 kl_uniform {out['kl_uniform']:.3f} precision "
            f"{out['precision']:.3f} recall {out['recall']:.3f} density {out['density']:.3f} "
            f"coverage {out['coverage']:.3f} (real data {ref['coverage_real']:.3f}) in "
            f"{time.perf_counter() - t0:.1f}s"
        )
        return out


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


def main(argv=None):
    cfg, ckpt = parse_config(argv)
    B, loss_name = cfg["batch_size"], cfg["loss"]
    # various inits, derived attributes, I/O setup
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and later
    torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg["dtype"]]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device.type, ptdtype)
    out_dir = cfg["out_dir"]
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    log_path, ckpt_path = os.path.join(out_dir, "log.json"), os.path.join(out_dir, "ckpt.pt")
    sample_path = os.path.join(out_dir, "samples", "{:06d}.png")

    # data: the whole training set, once, as one (N, 784) tensor in [-1, 1] on the device
    try:
        mirrors = [cfg["mirror"]] if cfg["mirror"] else None
        arrays = load_dataset(cfg["dataset"], cfg["data_dir"], mirrors)
    except ValueError as e:
        die(str(e))
    data = to_device(arrays[0], device)
    N = len(data)
    if N < B:
        die(f"--batch_size {B} is larger than the training set ({N} images)")
    steps_per_epoch = N // B  # the last partial batch is dropped: one shape, no recompiles

    # model and optimizers
    modules = build_models(cfg, device)
    G, D, opt_G, opt_D = (modules[k] for k in ("G", "D", "opt_G", "opt_D"))

    # where the run stands, fresh or from the checkpoint (the epoch's permutation and partial sums)
    step, epoch, perm, sums, elapsed, records = 0, 1, None, None, 0.0, []
    if ckpt is not None:
        try:
            restore(ckpt, modules, device)
        except ValueError as e:
            die(
                f"--resume: {ckpt_path} does not fit this run ({e}); resume with the flags it was "
                "made with, or use a new --out_dir"
            )
        for opt, lr in ((opt_G, cfg["lr"]), (opt_D, cfg["lr_d"])):  # the flags' lr, not the saved
            for group in opt.param_groups:
                group["lr"] = lr
                if "betas" in group:
                    group["betas"] = (cfg["b1"], cfg["b2"])
        step, epoch, perm = ckpt["step"], ckpt["epoch"], ckpt["perm"]
        sums, elapsed, records = ckpt["sums"], ckpt["elapsed"], load_records(log_path, ckpt["step"])
        perm = None if perm is None else perm.to(device)
        print(f"resumed from {ckpt_path} at step {step} (epoch {epoch})")
    log = {"script": SCRIPT, "config": cfg, "records": records}
    total_steps = min(cfg["epochs"] * steps_per_epoch, cfg["max_iters"] or math.inf)
    profiler = StepProfiler(cfg["profile"], step + WARMUP_STEPS, total_steps, out_dir, device)

    # compile: keep the raw modules for checkpoints, samples and the double backward of GP and R1
    G_c, D_c = G, D
    if cfg["compile"]:
        G_c, D_c = torch.compile(G, dynamic=False), torch.compile(D, dynamic=False)
    step_fn = partial(train_step, cfg, modules, G_c, D_c, total_steps=total_steps, ctx=ctx)
    if cfg["cuda_graph"]:
        step_fn = GraphedStep(step_fn, cfg["n_critic"])

    # evaluation; samples from one fixed z (its own generator, not training's RNG); meter; Ctrl-C
    evaluator = SampleEvaluator(cfg, arrays, data, device, ctx)
    fixed_rng = torch.Generator().manual_seed(cfg["seed"] + 1)
    z_fixed = torch.randn(25, cfg["latent_dim"], generator=fixed_rng).to(device)
    keys = log_keys(cfg)
    meter = Meter(keys + ["g_step"], cfg["log_interval"], device, sums)
    ctrl_c = CtrlC()

    print(
        f"{loss_name} on {cfg['dataset']}: {N} images, {steps_per_epoch} steps/epoch, "
        f"{total_steps} steps, device {device} {cfg['dtype']}{' compiled' * cfg['compile']}"
        f"{' cuda-graph' * cfg['cuda_graph']}"
    )
    if step == 0:
        save_samples(G, z_fixed, ctx, sample_path.format(step))
    saved_step = step if ckpt is not None else None
    start_step, bench_start = step, profiler.end  # after the warm-up (compiling) and profile
    last_epoch, eval_seconds, start = math.ceil(total_steps / steps_per_epoch), None, True
    t_start = time.perf_counter()
    t_interval = t_epoch = t_start  # start of the progress interval, and of the epoch's timed part
    bench_t0, paused = None, 0.0  # the final throughput: from bench_start, less checkpoint time
    while step < total_steps:
        # training step: one epoch = one permutation of the training set
        if perm is None:
            perm = torch.randperm(N, device=device)
        i = step - (epoch - 1) * steps_per_epoch  # batch index inside the epoch
        real = data[perm[i * B : (i + 1) * B]]
        z = torch.randn(B, cfg["latent_dim"], device=device)
        meter.push(step, step_fn(real, z, step))
        step += 1
        profiler(step)

        # read the meter back (a sync) only where it is needed: progress, epoch end, the timing
        end_of_epoch = step % steps_per_epoch == 0
        last_step = step == total_steps or ctrl_c.pressed
        if step % cfg["log_interval"] == 0 or end_of_epoch or last_step or step == bench_start:
            if bad := meter.flush():
                hint = "lower the learning rate or try another --loss"
                die(nan_message(bad, epoch, ckpt_path, saved_step, hint))
        if step == bench_start:  # the clock starts after the warm-up's work is done
            bench_t0, paused = time.perf_counter(), 0.0
        if step % cfg["log_interval"] == 0:
            now = time.perf_counter()
            s, n = meter.take_recent()
            m, g_mean = s / max(n, 1), s[1] / max(s[-1], 1)  # g_loss: over the steps G stepped
            rest = " ".join(f"{k} {v:.4f}" for k, v in zip(keys[2:], m[2:-1]))
            left = evals_left(epoch, last_epoch, cfg["eval_interval"])
            time_left = eta(total_steps - step, (now - t_interval) / n, left, eval_seconds)
            print(
                f"epoch {epoch}/{cfg['epochs']} step {step}/{total_steps} | d_loss {m[0]:.4f} "
                f"g_loss {g_mean:.4f} {rest} | {n * B / (now - t_interval):.0f} img/s | "
                f"{time_left}{run_length(total_steps - start_step, now - t_interval, n, start)}",
                flush=True,
            )
            t_interval, start = now, False
        if step % cfg["sample_interval"] == 0:
            save_samples(G, z_fixed, ctx, sample_path.format(step))
        if end_of_epoch or last_step:  # the epoch's record, the evaluation, the checkpoint
            t0 = time.perf_counter()
            epoch_start = (epoch - 1) * steps_per_epoch
            sums = meter.sums
            record = {"epoch": epoch, "step": step}
            record.update({k: sums[j] / (step - epoch_start) for j, k in enumerate(keys)})
            record["g_loss"] = sums[1] / max(sums[-1], 1)  # the mean over the steps where G stepped
            imgs = (step - max(epoch_start, start_step)) * B
            record["imgs_per_sec"] = imgs / max(t0 - t_epoch, 1e-9)
            record["time"] = elapsed + t0 - t_start
            if not end_of_epoch:
                record["partial"] = True  # the epoch goes on after a resume, which replaces this
            at_eval = end_of_epoch and epoch % max(cfg["eval_interval"], 1) == 0
            if cfg["eval_interval"] and (step == total_steps or at_eval):
                t_eval = time.perf_counter()
                record.update(evaluator(G, epoch))  # evaluation figures join their epoch's record
                eval_seconds = time.perf_counter() - t_eval
                if not any("fd_real" in r for r in log["records"]):
                    record.update(evaluator.reference)  # what real data reads: once per log
            log["records"].append(record)
            save_json_atomic(log, log_path)
            if end_of_epoch:
                epoch, perm, meter.sums = epoch + 1, None, None
            run = dict(step=step, epoch=epoch, elapsed=elapsed + time.perf_counter() - t_start)
            run.update(perm=None if perm is None else perm.cpu(), sums=meter.sums)
            save_torch_atomic(checkpoint(cfg, run, modules, device), ckpt_path)
            saved_step = step
            t1 = time.perf_counter()
            paused, t_interval, t_epoch = paused + t1 - t0, t_interval + t1 - t0, t1
        if last_step:
            break

    if device.type == "cuda":
        torch.cuda.synchronize()
    if bench_t0 is not None:
        rate = (step - bench_start) * B / (time.perf_counter() - bench_t0 - paused)
    save_samples(G, z_fixed, ctx, sample_path.format(step))
    if ctrl_c.pressed:
        print(
            f"interrupted at step {step}: checkpoint saved to {ckpt_path}; continue with --resume "
            f"--out_dir {out_dir}"
        )
    else:
        print(f"done: {step} steps; samples in {os.path.dirname(sample_path)}; log in {log_path}")
    if bench_t0 is not None and step > bench_start:
        print(f"{SCRIPT}: {rate:.1f} img/s (steps {bench_start}..{step}, training loop only)")


if __name__ == "__main__":
    main()
