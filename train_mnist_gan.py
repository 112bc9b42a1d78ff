"""
Seed 004's MNIST GAN (an MLP generator and discriminator), with every adversarial loss the seeds name.

    python train_mnist_gan.py                                   # seed 004: BCE, 200 epochs, batch 64
    python train_mnist_gan.py --dataset fashion --loss wgan-gp  # Fashion-MNIST, WGAN-GP
    python train_mnist_gan.py --dataset fashion --max_iters 20 --eval_interval 0 --device cpu   # smoke test, seconds
    python train_mnist_gan.py --resume --out_dir out/mnist_gan  # continue exactly where it stopped
    python plot_losses.py out/mnist_gan/log.json                # the curves, and what they mean

Losses (--loss), all computed from logits (D returns logits, never probabilities):
    bce      seed 004: d = (BCE(D(x),1) + BCE(D(G(z)),0)) / 2, non-saturating g = BCE(D(G(z)),1)
    minimax  seeds 000/003: the same d, saturating g = E[log(1 - D(G(z)))], the literal minimax game
    wgan     Arjovsky et al.: d = E[D(G(z))] - E[D(x)], g = -E[D(G(z))], weights clipped to +-clip_value
    wgan-gp  Gulrajani et al.: the WGAN losses + lambda_gp * E[(||grad D(x_hat)|| - 1)^2] at interpolates
    hinge    d = E[relu(1 - D(x))] + E[relu(1 + D(G(z)))], g = -E[D(G(z))]
    lsgan    Mao et al.: d = E[(D(x)-1)^2]/2 + E[D(G(z))^2]/2, g = E[(D(G(z))-1)^2]/2
--r1 GAMMA adds Mescheder et al.'s R1 penalty (GAMMA/2) * E[||grad_x D(x)||^2] on real data to any of them.

Output in --out_dir: log.json (per-epoch means, see plot_losses.py), samples/*.png (a 5x5 grid from one
fixed z), ckpt.pt (everything --resume needs). The last line printed is the throughput of the training loop.
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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SCRIPT = "train_mnist_gan.py"

# -----------------------------------------------------------------------------
# data: the four IDX files, downloaded from the official mirrors and checked against their MD5s

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
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
        local_dirs=["FashionMNIST/raw", "/usr/share/datasets/fashion-mnist"],  # torchvision; Debian's package
    ),
}


def read_idx(path):
    """An IDX file (raw or .gz) as a uint8 numpy array: (N, rows, cols) for images, (N,) for labels.
    Raises ValueError with a message a person can act on when the file is not a complete IDX file."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip raises BadGzipFile (an OSError) or EOFError when truncated
        raise ValueError(f"{path}: cannot be read ({e}); delete it so it is downloaded again") from None
    if len(raw) < 8:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header; delete it and download it again")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path}: bad magic number 0x{int.from_bytes(raw[:4], 'big'):08x} "
                         "(expected 0x00000801 for labels or 0x00000803 for images): not an IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise ValueError(f"{path}: header says {'x'.join(map(str, dims))} = {math.prod(dims)} bytes of data, "
                         f"file has {len(body)}: truncated or corrupt; delete it and download it again")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def download(name, md5, folder, mirrors):
    """Fetch one file from the first mirror that serves it, check its MD5, and move it into place atomically."""
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
    """Paths of the four IDX files: from data_dir (raw or .gz), then the usual local copies, else downloaded."""
    spec = DATASETS[dataset]
    for folder in [data_dir] + [os.path.join(data_dir, d) for d in spec["local_dirs"]]:
        found = [next((p for p in (os.path.join(folder, n + ".gz"), os.path.join(folder, n)) if os.path.exists(p)), None)
                 for n in IDX_FILES]
        if all(found):
            return found
    try:
        return [download(n + ".gz", md5, data_dir, mirrors or spec["mirrors"]) for n, md5 in zip(IDX_FILES, spec["md5"])]
    except ValueError as e:
        hint = " or use --dataset fashion (offline: apt-get install dataset-fashion-mnist)" if dataset == "mnist" else \
               " (offline on Debian/Ubuntu: apt-get install dataset-fashion-mnist)"
        raise ValueError(f"{dataset} not found in {data_dir} and the download failed ({e}). Put "
                         f"{', '.join(n + '.gz' for n in IDX_FILES)} in {data_dir}{hint}") from None


def load_dataset(dataset, data_dir, mirrors=None):
    """(train_images, train_labels, test_images, test_labels) as uint8 numpy arrays, shapes checked."""
    paths = find_idx(dataset, data_dir, mirrors)
    arrays = [read_idx(p) for p in paths]
    for p, a, rank in zip(paths, arrays, (3, 1, 3, 1)):
        if a.ndim != rank:
            raise ValueError(f"{p}: a {a.ndim}-d IDX array where {'images (3-d)' if rank == 3 else 'labels (1-d)'} belong")
    for imgs, labels, i in ((arrays[0], arrays[1], 0), (arrays[2], arrays[3], 2)):
        if len(imgs) != len(labels):
            raise ValueError(f"{paths[i]} has {len(imgs)} images but {paths[i + 1]} has {len(labels)} labels")
    return arrays

# -----------------------------------------------------------------------------
# models: seed 004's MLPs. D returns logits; probabilities, where shown, are sigmoid(logits).

class Generator(nn.Module):
    def __init__(self, latent_dim=100, img_shape=(1, 28, 28)):
        super().__init__()
        self.img_shape = img_shape

        def block(n_in, n_out, normalize=True):
            layers = [nn.Linear(n_in, n_out)]
            if normalize:
                # Seed 004 writes BatchNorm1d(n_out, 0.8) and calls 0.8 the momentum. The second positional
                # argument of BatchNorm1d is eps, so the code it describes runs with eps=0.8 and the default
                # momentum 0.1. We keep what the code does, spelled as the keyword it is.
                layers.append(nn.BatchNorm1d(n_out, eps=0.8))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        self.model = nn.Sequential(
            *block(latent_dim, 128, normalize=False), *block(128, 256), *block(256, 512), *block(512, 1024),
            nn.Linear(1024, math.prod(img_shape)), nn.Tanh())

    def forward(self, z):  # (B, latent_dim) -> (B, 1, 28, 28) in [-1, 1]
        return self.model(z).view(z.size(0), *self.img_shape)


class Discriminator(nn.Module):
    def __init__(self, img_shape=(1, 28, 28)):
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(math.prod(img_shape), 512), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(512, 256), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(256, 1))  # seed 004 ends in nn.Sigmoid(); we keep the logit (safe under autocast)

    def forward(self, img):  # (B, ...) -> (B, 1) logits
        return self.model(img.flatten(1))

# -----------------------------------------------------------------------------
# losses: pure functions of logits, each returning a scalar tensor. test_losses.py checks them against the
# seeds' own formulas. softplus(-t) = -log(sigmoid(t)) and softplus(t) = -log(1 - sigmoid(t)).

LOSSES = ("bce", "minimax", "wgan", "wgan-gp", "hinge", "lsgan")


def d_loss_fn(loss, real_logits, fake_logits):
    """The discriminator's (critic's) loss, to be minimised."""
    if loss in ("bce", "minimax"):  # seed 004: (BCE(D(x), 1) + BCE(D(G(z)), 0)) / 2
        return (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()) / 2
    if loss in ("wgan", "wgan-gp"):  # the critic maximises E[D(x)] - E[D(G(z))], so minimises its negative
        return fake_logits.mean() - real_logits.mean()
    if loss == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    if loss == "lsgan":  # a=0 (fake), b=1 (real)
        return 0.5 * (real_logits - 1).pow(2).mean() + 0.5 * fake_logits.pow(2).mean()
    raise ValueError(f"unknown loss {loss!r}")


def g_loss_fn(loss, fake_logits):
    """The generator's loss, to be minimised."""
    if loss == "bce":  # non-saturating: BCE(D(G(z)), 1) = -E[log D(G(z))]
        return F.softplus(-fake_logits).mean()
    if loss == "minimax":  # saturating: E[log(1 - D(G(z)))]; its gradient vanishes while D rejects the fakes
        return -F.softplus(fake_logits).mean()
    if loss in ("wgan", "wgan-gp", "hinge"):
        return -fake_logits.mean()
    if loss == "lsgan":  # c=1
        return 0.5 * (fake_logits - 1).pow(2).mean()
    raise ValueError(f"unknown loss {loss!r}")


def gradient_penalty(D, real, fake):
    """WGAN-GP: E[(||grad_x_hat D(x_hat)||_2 - 1)^2] with x_hat = eps*real + (1-eps)*fake, eps ~ U[0,1] per sample.
    Seed 002's snippet takes the gradient at the fakes, takes the norm over dim 1 only, and adds the term
    after backward(), so it never reaches the gradients. The penalty belongs at random interpolates (the
    Lipschitz constraint is enforced between the two distributions), over all of a sample's dimensions,
    and inside the loss that is differentiated (create_graph=True)."""
    eps = torch.rand(real.size(0), *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    x_hat = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
    grad, = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def r1_penalty(real_logits, real):
    """R1 (seed 001): mean over the batch of sum(grad^2), grad = d(sum of logits)/d(real). real must require grad."""
    grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()

# -----------------------------------------------------------------------------
# files: atomic writes, so an interrupted run never leaves half a file; image grids without torchvision

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
    """images (N, C, H, W) in [-1, 1], C = 1 or 3, to one PNG of nrow columns on a black background."""
    from PIL import Image
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    ncol = math.ceil(n / nrow)
    grid = torch.zeros(c, pad + ncol * (h + pad), pad + nrow * (w + pad), dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = x[i]
    img = Image.fromarray(grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy())
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)

# -----------------------------------------------------------------------------
# evaluation: our own classifier, trained on the real training data, and figures in its feature space.
# These are not Inception FID/IS/KID: they compare runs of this project with each other, not with papers.

def frechet_distance(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + tr(s1 + s2 - 2 (s1 s2)^(1/2)) between two Gaussians, in float64. tr (s1 s2)^(1/2) is
    computed as tr (s1^(1/2) s2 s1^(1/2))^(1/2), from two symmetric eigendecompositions: no complex parts,
    no scipy, and stable for singular covariances."""
    mu1, s1, mu2, s2 = (np.asarray(a, dtype=np.float64) for a in (mu1, s1, mu2, s2))
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # s1^(1/2)
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def kid(f1, f2, n_subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance's estimator (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial
    kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets. Near 0 for samples of one distribution."""
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    rng, m, d = np.random.default_rng(seed), min(subset_size, len(f1), len(f2)), f1.shape[1]
    total = 0.0
    for _ in range(n_subsets):
        x, y = f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        total += ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    return float(total / n_subsets)


def classifier_score(probs, eps=1e-12):
    """exp(E_x KL(p(y|x) || p(y))), the Inception Score's formula: 1 for one class (or no confidence), up to the
    number of classes for confident predictions spread evenly over all of them."""
    p = np.asarray(probs, dtype=np.float64)
    py = p.mean(0, keepdims=True)
    return float(np.exp((p * (np.log(p + eps) - np.log(py + eps))).sum(1).mean()))


class Classifier(nn.Module):
    """A LeNet-sized CNN; its penultimate layer (128 ReLU features) is the evaluation's feature space."""

    def __init__(self, n_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, n_classes)

    def forward(self, x):  # (B, 784) or (B, 1, 28, 28) in [-1, 1] -> features (B, 128), logits (B, 10)
        f = self.features(x.reshape(-1, 1, 28, 28))
        return f, self.head(f)


def train_classifier(x, y, device, batch_size=128, min_steps=600, min_epochs=3, seed=0):
    """Train the Classifier on images x (N, 784) in [-1, 1] with labels y, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
        torch.manual_seed(seed)
        clf = Classifier().to(device)
        opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
        steps_per_epoch = max(1, len(x) // batch_size)
        steps = max(min_steps, min_epochs * steps_per_epoch)
        for s in range(steps):
            if s % steps_per_epoch == 0:
                perm = torch.randperm(len(x), device=device)
            idx = perm[(s % steps_per_epoch) * batch_size:(s % steps_per_epoch + 1) * batch_size]
            loss = F.cross_entropy(clf(x[idx])[1], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return clf.eval().requires_grad_(False)


@torch.no_grad()
def embed(clf, x, batch_size=1000):
    """Features (float64 numpy) and class probabilities of inputs x under the classifier."""
    feats, probs = [], []
    for chunk in x.split(batch_size):
        f, logits = clf(chunk.float())
        feats.append(f.double().cpu()), probs.append(torch.softmax(logits.double(), 1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def gaussian(f):
    """Mean and covariance of features f (n, d); a single sample has zero covariance (np.cov would give NaN)."""
    return f.mean(0), (np.cov(f, rowvar=False) if len(f) > 1 else np.zeros((f.shape[1], f.shape[1])))


# -----------------------------------------------------------------------------
# config: defaults per loss from its paper or its best-known implementation

LOSS_DEFAULTS = {
    "bce": dict(optimizer="adam", lr=2e-4, lr_d=2e-4, b1=0.5, b2=0.999, n_critic=1),      # seed 004
    "minimax": dict(optimizer="adam", lr=2e-4, lr_d=2e-4, b1=0.5, b2=0.999, n_critic=1),  # seed 004's optimiser
    "wgan": dict(optimizer="rmsprop", lr=5e-5, lr_d=5e-5, b1=0.0, b2=0.0, n_critic=5),    # WGAN paper, Algorithm 1
    "wgan-gp": dict(optimizer="adam", lr=1e-4, lr_d=1e-4, b1=0.0, b2=0.9, n_critic=5),    # WGAN-GP paper, Algorithm 1
    "hinge": dict(optimizer="adam", lr=1e-4, lr_d=4e-4, b1=0.0, b2=0.9, n_critic=1),      # SAGAN / BigGAN (TTUR)
    "lsgan": dict(optimizer="adam", lr=2e-4, lr_d=2e-4, b1=0.5, b2=0.999, n_critic=1),    # LSGAN paper
}
WARMUP_STEPS = 10  # steps left out of the final throughput figure (torch.compile compiles in the first ones)


def build_parser():
    table = "; ".join(f"{k}: {v['optimizer']} lr {v['lr']:g}" + (f"/{v['lr_d']:g} (G/D)" if v["lr_d"] != v["lr"] else "")
                      + (f" betas ({v['b1']:g}, {v['b2']:g})" if v["optimizer"] == "adam" else "")
                      + f" n_critic {v['n_critic']}" for k, v in LOSS_DEFAULTS.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"Defaults that depend on --loss: {table}. WGAN clips D's weights to +-0.01; "
                                       "WGAN-GP uses lambda_gp 10.")
    # data
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist", help="MNIST or Fashion-MNIST (default mnist)")
    p.add_argument("--data_dir", default=None, help="folder with the four IDX files, raw or .gz (default data/<dataset>); "
                                                    "missing files are downloaded and their MD5 checked")
    p.add_argument("--mirror", default=None, help="base URL to download the IDX .gz files from, instead of the official mirrors")
    # model and loss
    p.add_argument("--latent_dim", type=int, default=100, help="size of z (seed 004: 100)")
    p.add_argument("--loss", choices=LOSSES, default="bce", help="adversarial loss (default bce, seed 004); see the top of the file")
    p.add_argument("--clip_value", type=float, default=0.01, help="wgan: D's weights are clipped to [-clip_value, clip_value]")
    p.add_argument("--lambda_gp", type=float, default=10.0, help="wgan-gp: weight of the gradient penalty (default 10)")
    p.add_argument("--r1", type=float, default=0.0, metavar="GAMMA", help="add (GAMMA/2) * R1 on real data to D's loss (default 0: off)")
    p.add_argument("--n_critic", type=int, default=None, help="D steps per G step (default per loss: 1, or 5 for wgan and wgan-gp)")
    # optimization
    p.add_argument("--epochs", type=int, default=200, help="passes over the training set (seed 004: 200)")
    p.add_argument("--max_iters", type=int, default=0, help="stop after this many steps in all (one step = one D update; 0: no limit)")
    p.add_argument("--batch_size", type=int, default=64, help="images per step (seed 004: 64)")
    p.add_argument("--lr", type=float, default=None, help="generator learning rate (default per loss; bce: 2e-4, seed 004)")
    p.add_argument("--lr_d", type=float, default=None, help="discriminator learning rate (default per loss; bce: same as --lr)")
    p.add_argument("--b1", type=float, default=None, help="Adam beta1 (default per loss; bce: 0.5, seed 004)")
    p.add_argument("--b2", type=float, default=None, help="Adam beta2 (default per loss; bce: 0.999, seed 004)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    # I/O
    p.add_argument("--out_dir", default="out/mnist_gan", help="where log.json, samples/ and ckpt.pt go")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt; flags not given take the checkpoint's values")
    p.add_argument("--log_interval", type=int, default=100, help="print a progress line every this many steps")
    p.add_argument("--sample_interval", type=int, default=400, help="save a 5x5 sample grid every this many steps (seed 004: 400)")
    # evaluation
    p.add_argument("--eval_interval", type=int, default=10, help="evaluate every this many epochs and at the end (0: never)")
    p.add_argument("--eval_samples", type=int, default=10000, help="generated images per evaluation (default 10000)")
    p.add_argument("--mode_share", type=float, default=0.02, help="a class counts as covered (modes) if it gets at least this "
                                                                  "share of the samples (default 0.02; uniform is 0.1)")
    p.add_argument("--min_clf_acc", type=float, default=0.8, help="warn when the evaluation classifier's test accuracy is below this")
    # system
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:1, cpu, ...")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="autocast dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile G and D (default: on for CUDA, off for CPU)")
    return p


def die(msg):
    """A user mistake: one line on stderr and exit status 2, no traceback."""
    print(f"{SCRIPT}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_config(argv=None):
    """The run's config as a dict. With --resume, flags not given on the command line come from the checkpoint."""
    p = build_parser()
    args = p.parse_args(argv)
    cfg, ckpt = vars(args), None
    if args.resume:
        path = os.path.join(args.out_dir, "ckpt.pt")
        if not os.path.exists(path):
            die(f"--resume: no checkpoint at {path}; start without --resume, or point --out_dir at the run")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say so in one line
            die(f"--resume: {path} cannot be loaded ({type(e).__name__}: {str(e).strip().splitlines()[0][:150]})")
        if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
            die(f"--resume: {path} is not a checkpoint of {SCRIPT}")
        for a in p._actions:  # parse again with no defaults: what is left was typed on the command line
            a.default = argparse.SUPPRESS
        given = vars(p.parse_args(argv))
        for k in ("latent_dim", "dataset", "loss"):  # what the networks and optimizers in the checkpoint are built for
            if k in given and given[k] != ckpt["config"][k]:
                die(f"--resume: --{k} {given[k]} differs from the checkpoint's {ckpt['config'][k]}; use a new --out_dir")
        for k, v in given.items():
            if k in ckpt["config"] and v != ckpt["config"][k] and k not in ("resume", "device", "compile", "dtype"):
                print(f"resume: --{k} changed from {ckpt['config'][k]} to {v}")
        cfg = {**ckpt["config"], **given, "resume": True}
        cfg.setdefault("data_dir", None)
    for k, v in LOSS_DEFAULTS[cfg["loss"]].items():
        if cfg.get(k) is None:
            cfg[k] = v
    if cfg["data_dir"] is None:
        cfg["data_dir"] = os.path.join("data", cfg["dataset"])
    # impossible values: one line each
    for k in ("epochs", "batch_size", "latent_dim", "n_critic", "log_interval", "sample_interval"):
        if cfg[k] < 1:
            die(f"--{k} must be at least 1, got {cfg[k]}")
    if cfg["batch_size"] < 2:
        die("--batch_size must be at least 2 (the generator's BatchNorm needs more than one sample)")
    for k in ("lr", "lr_d", "clip_value"):
        if not cfg[k] > 0:
            die(f"--{k} must be positive, got {cfg[k]}")
    if cfg["eval_samples"] < 2:
        die(f"--eval_samples must be at least 2, got {cfg['eval_samples']}")
    if not 0 < cfg["mode_share"] <= 1:
        die(f"--mode_share is a share of the samples, in (0, 1], got {cfg['mode_share']}")
    for k in ("lambda_gp", "r1", "max_iters", "eval_interval"):
        if cfg[k] < 0:
            die(f"--{k} must be zero or positive, got {cfg[k]}")
    for k in ("b1", "b2"):
        if not 0 <= cfg[k] < 1:
            die(f"--{k} must be in [0, 1), got {cfg[k]}")
    try:
        dev = torch.device(cfg["device"])
    except RuntimeError as e:
        die(f"--device {cfg['device']}: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        die(f"--device {cfg['device']}: CUDA is not available here; use --device cpu")
    cfg["dtype"] = cfg["dtype"] or ("bfloat16" if dev.type == "cuda" else "float32")
    cfg["compile"] = dev.type == "cuda" if cfg["compile"] is None else cfg["compile"]
    return cfg, ckpt

# -----------------------------------------------------------------------------

def main(argv=None):
    cfg, ckpt = parse_config(argv)
    B, loss_name = cfg["batch_size"], cfg["loss"]
    # various inits, derived attributes, I/O setup
    device = torch.device(cfg["device"])
    device_type = device.type
    torch.manual_seed(cfg["seed"])
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and later
    torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
    os.makedirs(os.path.join(cfg["out_dir"], "samples"), exist_ok=True)
    log_path, ckpt_path = os.path.join(cfg["out_dir"], "log.json"), os.path.join(cfg["out_dir"], "ckpt.pt")

    # data: the whole training set, once, as one (N, 784) tensor in [-1, 1] on the device
    try:
        arrays = load_dataset(cfg["dataset"], cfg["data_dir"], [cfg["mirror"]] if cfg["mirror"] else None)
    except ValueError as e:
        die(str(e))
    train_x, train_y, test_x, test_y = arrays
    if train_x.shape[1:] != (28, 28) or test_x.shape[1:] != (28, 28):
        die(f"expected 28x28 images, the IDX files hold {train_x.shape[1]}x{train_x.shape[2]} and {test_x.shape[1]}x{test_x.shape[2]}")

    def to_device(imgs):  # uint8 (N, 28, 28) -> (N, 784) in [-1, 1] on the device, as seed 004's (x/255 - 0.5) / 0.5
        return torch.from_numpy(imgs.copy()).to(device).view(len(imgs), -1).float().div_(127.5).sub_(1)
    data = to_device(train_x)
    N = len(data)
    if N < B:
        die(f"--batch_size {B} is larger than the training set ({N} images)")
    steps_per_epoch = N // B  # the last partial batch is dropped: every step has one shape (no recompiles)

    # model init
    G, D = Generator(cfg["latent_dim"]).to(device), Discriminator().to(device)
    g_params = list(G.parameters())

    # optimizers: fused Adam does each update in one pass over the parameters (1.3x the whole step on 2 CPU cores)
    def make_opt(params, lr):
        if cfg["optimizer"] == "rmsprop":
            return torch.optim.RMSprop(params, lr=lr)
        return torch.optim.Adam(params, lr=lr, betas=(cfg["b1"], cfg["b2"]), fused=True)
    opt_G, opt_D = make_opt(G.parameters(), cfg["lr"]), make_opt(D.parameters(), cfg["lr_d"])
    scaler_G = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))
    scaler_D = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))

    # the log, and the state a checkpoint restores
    keys = ["d_loss", "g_loss", "d_real", "d_fake"] + (["gp"] if loss_name == "wgan-gp" else []) + (["r1"] if cfg["r1"] > 0 else [])
    log = {"script": SCRIPT, "config": cfg, "records": []}
    step, epoch, perm, sums, elapsed = 0, 1, None, None, 0.0
    if ckpt is not None:
        try:
            G.load_state_dict(ckpt["G"]), D.load_state_dict(ckpt["D"])
            opt_G.load_state_dict(ckpt["opt_G"]), opt_D.load_state_dict(ckpt["opt_D"])
        except (RuntimeError, ValueError, KeyError) as e:
            die(f"--resume: {ckpt_path} does not fit this run ({' '.join(str(e).split())[:220]}); "
                "resume with the flags it was made with, or use a new --out_dir")
        for opt, lr in ((opt_G, cfg["lr"]), (opt_D, cfg["lr_d"])):  # a state_dict brings its old lr: the flags win
            for group in opt.param_groups:
                group["lr"] = lr
                if "betas" in group:
                    group["betas"] = (cfg["b1"], cfg["b2"])
        scaler_G.load_state_dict(ckpt["scaler_G"]), scaler_D.load_state_dict(ckpt["scaler_D"])
        step, epoch, perm, sums, elapsed = ckpt["step"], ckpt["epoch"], ckpt["perm"], ckpt["sums"], ckpt["elapsed"]
        perm = None if perm is None else perm.to(device)
        torch.set_rng_state(ckpt["rng_cpu"])
        if device_type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        if os.path.exists(log_path):  # keep the records up to the checkpoint, drop what came after it
            with open(log_path) as f:
                old = json.load(f)
            log["records"] = [r for r in old.get("records", []) if r["step"] <= step and not r.get("partial")]
        print(f"resumed from {ckpt_path} at step {step} (epoch {epoch})")
    total_steps = cfg["epochs"] * steps_per_epoch
    if cfg["max_iters"]:
        total_steps = min(total_steps, cfg["max_iters"])

    # compile: keep the raw modules for checkpoints, samples and the double backward of GP/R1
    G_c, D_c = G, D
    if cfg["compile"]:
        G_c, D_c = torch.compile(G, dynamic=False), torch.compile(D, dynamic=False)

    # one fixed z for every sample grid, drawn from its own generator so it leaves the training RNG alone
    z_fixed = torch.randn(25, cfg["latent_dim"], generator=torch.Generator().manual_seed(cfg["seed"] + 1)).to(device)

    def save_samples(tag):
        G.eval()  # BatchNorm uses its running statistics: the grid does not depend on batch composition
        with torch.no_grad(), ctx:
            imgs = G(z_fixed)
        G.train()
        path = os.path.join(cfg["out_dir"], "samples", f"{tag}.png")
        save_grid(imgs, path, nrow=5, scale=2)
        return path

    def save_checkpoint():
        save_torch_atomic({
            "script": SCRIPT, "config": cfg, "step": step, "epoch": epoch, "elapsed": elapsed + time.perf_counter() - t_start,
            "G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
            "scaler_G": scaler_G.state_dict(), "scaler_D": scaler_D.state_dict(),
            "perm": None if perm is None else perm.cpu(), "sums": sums,  # the epoch in progress
            "rng_cpu": torch.get_rng_state(), "rng_cuda": torch.cuda.get_rng_state(device) if device_type == "cuda" else None,
        }, ckpt_path)

    # evaluation: the classifier is trained the first time it is needed and cached in out_dir, keyed by the data
    ev = {"ref_logged": any("fd_real" in r for r in log["records"])}

    def _setup_eval():
        digest = hashlib.sha1(b"".join(a.tobytes() for a in arrays) + b"Classifier 16-32-128").hexdigest()[:16]
        path = os.path.join(cfg["out_dir"], f"classifier_{digest}.pt")
        # a fixed slice of the training set is held out from the classifier: real images that stand in for the
        # samples, so the reference figures (fd_real, kid_real, is_real) say what "as good as real data" reads
        perm_ = torch.randperm(N, generator=torch.Generator().manual_seed(0)).to(device)
        hold, fit = perm_[:min(cfg["eval_samples"], N // 6)], perm_[min(cfg["eval_samples"], N // 6):]
        y = torch.from_numpy(train_y.astype(np.int64)).to(device)
        x_test = to_device(test_x)
        if os.path.exists(path):
            saved_clf = torch.load(path, map_location=device, weights_only=True)
            clf = Classifier().to(device)
            clf.load_state_dict(saved_clf["state"])
            clf.eval().requires_grad_(False)
            f_test, _ = embed(clf, x_test)
            acc = saved_clf["acc"]
        else:
            t = time.perf_counter()
            clf = train_classifier(data[fit], y[fit], device)
            f_test, p_test = embed(clf, x_test)
            acc = float((p_test.argmax(1) == test_y).mean())
            save_torch_atomic({"state": clf.state_dict(), "acc": acc, "digest": digest}, path)
            print(f"evaluation classifier: trained in {time.perf_counter() - t:.0f}s on {len(fit)} images, "
                  f"test accuracy {acc:.3f}; cached in {path}")
        if acc < cfg["min_clf_acc"]:
            print(f"warning: the evaluation classifier's test accuracy is {acc:.3f} (< --min_clf_acc {cfg['min_clf_acc']}): "
                  "fd, kid, is and modes mean little with it", file=sys.stderr)
        f_ref, p_ref = embed(clf, data[hold])
        ev.update(clf=clf, f_test=f_test, test=gaussian(f_test), ref={
            "clf_acc": acc, "fd_real": frechet_distance(*gaussian(f_ref), *gaussian(f_test)),
            "kid_real": kid(f_ref, f_test), "is_real": classifier_score(p_ref)})

    def setup_eval():
        # building (or loading) the classifier draws weight inits: fork the RNG so training's stays as it was,
        # whether the classifier is trained here or loaded on resume
        with torch.random.fork_rng(devices=[device] if device_type == "cuda" else []):
            _setup_eval()

    def evaluate():
        """fd, kid, is, modes, kl_uniform of --eval_samples images from one fixed set of z."""
        if "clf" not in ev:
            setup_eval()
        gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 2)  # its own RNG: training's is untouched
        G.eval()
        with torch.no_grad(), ctx:
            imgs = torch.cat([G(torch.randn(len(c), cfg["latent_dim"], generator=gen, device=device)).float().flatten(1)
                              for c in torch.arange(cfg["eval_samples"]).split(1000)])
        G.train()
        f, p = embed(ev["clf"], imgs)
        share = np.bincount(p.argmax(1), minlength=10) / len(p)
        out = {"fd": frechet_distance(*gaussian(f), *ev["test"]), "kid": kid(f, ev["f_test"]), "is": classifier_score(p),
               "modes": int((share >= cfg["mode_share"]).sum()),
               "kl_uniform": float((share[share > 0] * np.log(share[share > 0] * 10)).sum())}
        print(f"eval epoch {epoch}: fd {out['fd']:.3f} (real data {ev['ref']['fd_real']:.3f}) kid {out['kid']:.4f} "
              f"is {out['is']:.2f} (real data {ev['ref']['is_real']:.2f}) modes {out['modes']}/10 kl_uniform {out['kl_uniform']:.3f}")
        if not ev["ref_logged"]:
            out.update(ev["ref"])
            ev["ref_logged"] = True
        return out

    # Ctrl-C: finish the step, save a checkpoint, then stop (a second Ctrl-C stops at once)
    stop = {"signal": False}

    def on_sigint(signum, frame):
        stop["signal"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, on_sigint)

    # per-step scalars go into a ring buffer on the device, read back once per log interval: no sync in the step
    K = len(keys) + 1  # + a column that says whether G stepped
    buf = torch.zeros(cfg["log_interval"], K, device=device)
    zero = torch.zeros((), device=device)
    pending = []  # the steps whose rows are in buf, not read back yet
    isums = np.zeros(K + 1)  # sums since the last progress line, and their row count

    def flush():
        """Read the buffered rows back (a sync point), add them to the sums, stop on a non-finite loss."""
        nonlocal sums, isums
        if not pending:
            return
        rows = buf[:len(pending)].double().cpu().numpy()
        bad = ~np.isfinite(rows).all(1)
        if bad.any():
            i = int(np.argmax(bad))
            which = [k for k, v in zip(keys, rows[i]) if not np.isfinite(v)]
            die(f"non-finite {', '.join(which)} at step {pending[i] + 1} (epoch {epoch}); stopped. "
                + (f"The last good checkpoint is {ckpt_path} (step {saved['step']})" if saved["step"] is not None
                   else "No checkpoint was written yet") + "; lower the learning rate or try another --loss")
        s = rows.sum(0)
        sums = s.tolist() if sums is None else [a + b for a, b in zip(sums, s.tolist())]  # plain floats: weights_only loads
        isums = isums + np.append(s, len(rows))
        pending.clear()

    print(f"{loss_name} on {cfg['dataset']}: {N} images, {steps_per_epoch} steps/epoch, {total_steps} steps, "
          f"device {device} {cfg['dtype']}{' compiled' if cfg['compile'] else ''}")
    if step == 0:
        save_samples(f"{step:06d}")
    saved = {"step": step if ckpt is not None else None}
    start_step = step
    t_start = time.perf_counter()
    t_interval = t_epoch = t_start  # start of the progress interval, and of the epoch's timed part
    bench_t0, paused = None, 0.0  # the final throughput: from step start_step + WARMUP_STEPS, less checkpoint time
    while step < total_steps:
        # -------------------------------------------------------------------------
        # training step: one epoch = one permutation of the training set
        if perm is None:
            perm = torch.randperm(N, device=device)
        i = step - (epoch - 1) * steps_per_epoch  # batch index inside the epoch
        real = data[perm[i * B:(i + 1) * B]]
        z = torch.randn(B, cfg["latent_dim"], device=device)
        g_step = step % cfg["n_critic"] == 0
        # generator step first, then the discriminator on the same fakes, detached (seed 004's order)
        if g_step:
            with ctx:
                fake = G_c(z)
                g_loss = g_loss_fn(loss_name, D_c(fake).float())
            opt_G.zero_grad(set_to_none=True)
            scaler_G.scale(g_loss).backward(inputs=g_params)  # grads for G only: D's weight grads are not needed
            scaler_G.step(opt_G)
            scaler_G.update()
        else:
            with torch.no_grad(), ctx:
                fake = G_c(z)
            g_loss = zero
        fake = fake.detach().view(B, -1).to(real.dtype)
        with ctx:
            logits = D_c(torch.cat([real, fake])).float()  # real and fake in one pass: D has no BatchNorm
        real_logits, fake_logits = logits[:B], logits[B:]
        d_loss = d_loss_fn(loss_name, real_logits, fake_logits)
        if loss_name in ("bce", "minimax", "lsgan"):  # D(x) and D(G(z)) as probabilities
            stats = [torch.sigmoid(real_logits).mean(), torch.sigmoid(fake_logits).mean()]
        else:  # critic scores
            stats = [real_logits.mean(), fake_logits.mean()]
        # penalties: autocast off, float32, through the raw D (a compiled graph has no double backward)
        if loss_name == "wgan-gp":
            gp = gradient_penalty(D, real, fake)
            d_loss = d_loss + cfg["lambda_gp"] * gp
            stats.append(gp)
        if cfg["r1"] > 0:
            real_r1 = real.detach().requires_grad_(True)
            r1 = r1_penalty(D(real_r1), real_r1)
            d_loss = d_loss + cfg["r1"] / 2 * r1
            stats.append(r1)
        opt_D.zero_grad(set_to_none=True)
        scaler_D.scale(d_loss).backward()
        scaler_D.step(opt_D)
        scaler_D.update()
        if loss_name == "wgan":  # weight clipping keeps the critic (roughly) Lipschitz
            with torch.no_grad():
                torch._foreach_clamp_min_(list(D.parameters()), -cfg["clip_value"])
                torch._foreach_clamp_max_(list(D.parameters()), cfg["clip_value"])
        # the logged d_loss is the whole objective D minimised, penalties included
        buf[len(pending)] = torch.stack([d_loss.detach(), g_loss.detach()] + [s.detach() for s in stats] + [zero + g_step])
        pending.append(step)
        step += 1

        # -------------------------------------------------------------------------
        # progress line, samples, end of epoch: log record and checkpoint
        if step == start_step + WARMUP_STEPS:
            flush()  # a sync, so the clock starts after the warm-up's work is done
            bench_t0, paused = time.perf_counter(), 0.0
        if len(pending) == cfg["log_interval"]:
            flush()
        if step % cfg["log_interval"] == 0:
            flush()
            now = time.perf_counter()
            m = isums[:-1] / max(isums[-1], 1)
            g_mean = isums[1] / max(isums[-2], 1)
            print(f"epoch {epoch}/{cfg['epochs']} step {step}/{total_steps} | d_loss {m[0]:.4f} g_loss {g_mean:.4f} "
                  + " ".join(f"{k} {v:.4f}" for k, v in zip(keys[2:], m[2:]))
                  + f" | {isums[-1] * B / (now - t_interval):.0f} img/s", flush=True)
            t_interval, isums = now, np.zeros(K + 1)
        if step % cfg["sample_interval"] == 0:
            save_samples(f"{step:06d}")
        end_of_epoch = step % steps_per_epoch == 0
        last_step = step == total_steps or stop["signal"]
        if end_of_epoch or last_step:
            flush()
            t0 = time.perf_counter()
            epoch_start = (epoch - 1) * steps_per_epoch
            record = {"epoch": epoch, "step": step}
            record.update({k: sums[j] / (step - epoch_start) for j, k in enumerate(keys)})
            record["g_loss"] = sums[1] / max(sums[-1], 1)  # the mean over the steps where G stepped
            record["imgs_per_sec"] = (step - max(epoch_start, start_step)) * B / max(t0 - t_epoch, 1e-9)
            record["time"] = elapsed + t0 - t_start
            if not end_of_epoch:
                record["partial"] = True  # the epoch goes on after a resume, and this record is then replaced
            if cfg["eval_interval"] and (step == total_steps or (end_of_epoch and epoch % cfg["eval_interval"] == 0)):
                record.update(evaluate())  # evaluation figures join the record of their epoch
            log["records"].append(record)
            save_json_atomic(log, log_path)
            if end_of_epoch:
                epoch, perm, sums = epoch + 1, None, None
            save_checkpoint()
            saved["step"] = step
            t1 = time.perf_counter()
            paused, t_interval, t_epoch = paused + t1 - t0, t_interval + t1 - t0, t1
        if last_step:
            break

    # -----------------------------------------------------------------------------
    flush()
    if device_type == "cuda":
        torch.cuda.synchronize()
    rate = None if bench_t0 is None else (step - start_step - WARMUP_STEPS) * B / (time.perf_counter() - bench_t0 - paused)
    final = save_samples(f"{step:06d}")
    if stop["signal"]:
        print(f"interrupted at step {step}: checkpoint saved to {ckpt_path}; continue with --resume --out_dir {cfg['out_dir']}")
    else:
        print(f"done: {step} steps; samples in {os.path.dirname(final)}; log in {log_path}")
    if rate is not None and step > start_step + WARMUP_STEPS:
        print(f"{SCRIPT}: {rate:.1f} img/s (steps {start_step + WARMUP_STEPS}..{step}, training loop only)")


if __name__ == "__main__":
    main()
