"""
Seed 001's StarGAN v2 in Stable Diffusion VAE latent space: every loss and log as the seed documents them.

    python encode_latents.py --images data/afhq/train --out data/latents.pt   # first: images -> latents
    python train_latent_stargan.py --data data/latents.pt --ds_decay_epochs 20
    python train_latent_stargan.py --resume --out_dir out/latent_stargan     # continue exactly
    python plot_losses.py out/latent_stargan/log.json                        # the curves, and what they mean
    python train_latent_stargan.py --data data/tiny.pt --epochs 2 --epoch_size 64 --batch_size 8 \\
        --g_dim 32 --e_dim 16 --d_dim 16 --f_dim 64 --device cpu               # smoke test, seconds

One step (seed 001). content, x_ref = latents * latent_scale; y_trg uniform, never y_src.
  ref path: s_ref = E(x_ref, y_trg)    latent path: s_lat = F(z_trg, y_trg)
  D:  d_loss = 0.5 * (d_hinge(D(x_ref), D(G(content, s_ref).detach())) + d_hinge(D(x_ref), D(G(content, s_lat).detach())))
      + (w_r1 * r1_interval) * r1 on steps where step % r1_interval == 0 (r1 in float32, autocast off)
  G:  g_loss = w_adv*g_adv + w_sty*sty + w_cyc*cyc + w_id*id - lambda_ds(epoch)*ds
      g_adv = -mean D(fake_ref) - mean D(fake_lat)       sty = L1(E(fake_ref), s_ref) + L1(E(fake_lat), s_lat)
      ds = L1(G(content, F(z_1)), G(content, F(z_2))), clamped at ds_margin
      cyc = L1(G(fake_ref, s_src), content) + L1(G(fake_lat, s_src), content), s_src = E(content, y_src)
      id = L1(G(content, s_src), content) when w_id > 0, else logged as 0
  lambda_ds(epoch) = w_ds * (1 - clamp((epoch - 1) / ds_decay_epochs, 0, 1)): w_ds at epoch 1, 0 from ds_decay_epochs+1.
Every loss is computed on the scaled latents. G, E and F are updated together; D separately.

Output in --out_dir: log.json (per-epoch means of d_loss g_loss g_adv sty ds cyc id r1 d_real d_fake, with
lambda_ds, imgs_per_sec and time), samples/ (reference- and latent-guided grids every epoch, decoded through the
VAE when it loads), ckpt.pt (everything --resume needs).
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
WARMUP_STEPS = 10  # steps left out of the final throughput figure (torch.compile compiles in the first ones)

# -----------------------------------------------------------------------------
# losses (seed 001's loss.py and trainer.py): small pure functions, checked against the seed by test_losses.py

def d_hinge_loss(real_logits, fake_logits):
    """mean(relu(1 - real)) + mean(relu(1 + fake)): 2 when every logit is 0."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def g_adversarial_loss(fake_logits):
    """-mean(fake_logits): G wants D's logits on its fakes as large as possible."""
    return -fake_logits.mean()


def r1_penalty(real_logits, real):
    """R1 (seed 001): mean over the batch of sum(grad^2), grad = d(sum of logits)/d(real). real must require grad."""
    grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def style_reconstruction_loss(pred_style, target_style):
    """L1(E(G(x, s)), s): the output's style must be recoverable."""
    return F.l1_loss(pred_style, target_style)


def diversity_sensitive_loss(fake_1, fake_2, margin=None):
    """L1(fake_1, fake_2), clamped at margin when one is set. It enters g_loss with a minus sign."""
    dist = F.l1_loss(fake_1, fake_2)
    return dist.clamp(max=margin) if margin else dist


def cycle_consistency_loss(reconstructed, original):
    """L1(G(G(x, s_trg), s_src), x): translating back must recover the content."""
    return F.l1_loss(reconstructed, original)


def identity_loss(output, content):
    """L1(G(x, s_src), x): the source's own style must leave the content unchanged."""
    return F.l1_loss(output, content)


def lambda_ds(epoch, w_ds, ds_decay_epochs):
    """The diversity weight at an epoch (counted from 1): w_ds, falling linearly to 0 at ds_decay_epochs + 1.
    ds_decay_epochs 0 means no decay."""
    if ds_decay_epochs <= 0:
        return float(w_ds)
    progress = min(max((epoch - 1) / ds_decay_epochs, 0.0), 1.0)
    return float(w_ds) * (1.0 - progress)

# -----------------------------------------------------------------------------
# networks: StarGAN v2's design, sized for 4-channel latents (32x32 at 256 px)

class ResBlk(nn.Module):
    """Pre-activation residual block: [IN] lrelu conv [pool] [IN] lrelu conv, plus a shortcut, over sqrt(2)."""

    def __init__(self, dim_in, dim_out, normalize=False, downsample=False, sn=False):
        super().__init__()
        wrap = spectral_norm if sn else (lambda m: m)
        self.normalize, self.downsample = normalize, downsample
        self.conv1, self.conv2 = wrap(nn.Conv2d(dim_in, dim_in, 3, 1, 1)), wrap(nn.Conv2d(dim_in, dim_out, 3, 1, 1))
        if normalize:
            self.norm1, self.norm2 = nn.InstanceNorm2d(dim_in, affine=True), nn.InstanceNorm2d(dim_in, affine=True)
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
        self.conv1, self.conv2 = nn.Conv2d(dim_in, dim_out, 3, 1, 1), nn.Conv2d(dim_out, dim_out, 3, 1, 1)
        self.sc = nn.Conv2d(dim_in, dim_out, 1, bias=False) if dim_in != dim_out else None

    def forward(self, x, s):
        sc = x if self.sc is None else self.sc(x)
        r = F.leaky_relu(self.norm1(x, s), 0.2)
        if self.upsample:
            sc, r = F.interpolate(sc, scale_factor=2, mode="nearest"), F.interpolate(r, scale_factor=2, mode="nearest")
        r = self.conv2(F.leaky_relu(self.norm2(self.conv1(r), s), 0.2))
        return (sc + r) / math.sqrt(2)


class Generator(nn.Module):
    """G(content, s): instance-normalised encoder blocks, AdaIN decoder blocks, latents in and latents out.
    The output is linear: SD latents are unbounded, and a tanh clipped their outliers into blotches."""

    def __init__(self, channels=4, dim=256, style_dim=64, n_blocks=6, n_down=1):
        super().__init__()
        half = n_blocks // 2
        self.from_latent = nn.Conv2d(channels, dim, 3, 1, 1)
        self.encode = nn.ModuleList(ResBlk(dim, dim, normalize=True, downsample=i < n_down) for i in range(half))
        self.decode = nn.ModuleList(AdainResBlk(dim, dim, style_dim, upsample=i >= half - n_down) for i in range(half))
        self.to_latent = nn.Sequential(nn.InstanceNorm2d(dim, affine=True), nn.LeakyReLU(0.2), nn.Conv2d(dim, channels, 1))

    def forward(self, x, s):  # (B, C, H, W), (B, style_dim) -> (B, C, H, W)
        h = self.from_latent(x)
        for blk in self.encode:
            h = blk(h)
        for blk in self.decode:
            h = blk(h, s)
        return self.to_latent(h)


class MappingNetwork(nn.Module):
    """F(z, y): a shared MLP trunk, then one MLP head per domain; returns the head of domain y."""

    def __init__(self, latent_dim=16, style_dim=64, num_domains=2, hidden=512, n_shared=3, n_head=3):
        super().__init__()
        layers = []
        for i in range(n_shared):
            layers += [nn.Linear(latent_dim if i == 0 else hidden, hidden), nn.ReLU()]
        self.shared = nn.Sequential(*layers)
        self.heads = nn.ModuleList(
            nn.Sequential(*[m for _ in range(n_head) for m in (nn.Linear(hidden, hidden), nn.ReLU())], nn.Linear(hidden, style_dim))
            for _ in range(num_domains))

    def forward(self, z, y):  # (B, latent_dim), (B,) -> (B, style_dim)
        h = self.shared(z)
        out = torch.stack([head(h) for head in self.heads], dim=1)  # (B, domains, style_dim)
        return out[torch.arange(len(y), device=y.device), y]


def conv_trunk(channels, size, dim, max_dim, sn):
    """Shared by E and D: conv, residual blocks halving the size down to 4x4 (at most 3 times), then to 1x1."""
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
    """E(x, y): a conv trunk, then one linear head per domain (as one matmul); returns the head of domain y."""

    def __init__(self, channels=4, size=32, style_dim=64, num_domains=2, dim=128, max_dim=512):
        super().__init__()
        self.trunk, d = conv_trunk(channels, size, dim, max_dim, sn=False)
        self.heads = nn.Linear(d, num_domains * style_dim)
        self.style_dim = style_dim

    def forward(self, x, y):
        out = self.heads(self.trunk(x).flatten(1)).view(len(y), -1, self.style_dim)
        return out[torch.arange(len(y), device=y.device), y]


class Discriminator(nn.Module):
    """D(x, y): a conv trunk with spectral norm on every conv and no instance norm (it would erase the per-channel
    statistics that carry style), one logit per domain; returns the logit of domain y."""

    def __init__(self, channels=4, size=32, num_domains=2, dim=128, max_dim=512):
        super().__init__()
        self.trunk, d = conv_trunk(channels, size, dim, max_dim, sn=True)
        self.head = spectral_norm(nn.Conv2d(d, num_domains, 1))

    def forward(self, x, y):  # -> (B,) logits
        out = self.head(self.trunk(x)).flatten(1)
        return out[torch.arange(len(y), device=y.device), y]

# -----------------------------------------------------------------------------
# data, VAE, files

def load_latents(path):
    """The latents .pt of encode_latents.py, checked. ValueError says what is wrong."""
    if not os.path.exists(path):
        raise ValueError(f"--data {path}: no such file; make one with encode_latents.py --images DIR --out {path}")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--data {path}: cannot be loaded ({type(e).__name__}: {str(e).strip().splitlines()[0][:150]})") from None
    if not isinstance(d, dict) or not {"latents", "labels", "domains"} <= set(d):
        raise ValueError(f"--data {path}: not a latents file of encode_latents.py (it needs 'latents', 'labels', 'domains')")
    lat, labels, domains = d["latents"], d["labels"], list(d["domains"])
    if not torch.is_tensor(lat) or lat.dim() != 4:
        raise ValueError(f"--data {path}: latents of shape {tuple(getattr(lat, 'shape', ()))}, expected (N, C, H, W)")
    if not torch.is_tensor(labels) or labels.shape != (len(lat),):
        raise ValueError(f"--data {path}: {len(lat)} latents but labels of shape {tuple(getattr(labels, 'shape', ()))}")
    if len(domains) < 2:
        raise ValueError(f"--data {path}: {len(domains)} domain ({', '.join(domains)}); the StarGAN translates between "
                         "domains and needs at least 2")
    counts = torch.bincount(labels.long(), minlength=len(domains))
    if len(counts) > len(domains) or labels.min() < 0 or (counts < 2).any():
        raise ValueError(f"--data {path}: labels must be 0..{len(domains) - 1} with at least 2 latents per domain "
                         f"(counts {counts.tolist()})")
    return d


def load_vae(name, subfolder, device, dtype):
    """diffusers' AutoencoderKL from a Hub id or a local folder, in eval mode. ValueError says how to fix it."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    levels = diffusers_logging.get_verbosity(), hub_logging.get_verbosity()
    diffusers_logging.set_verbosity_error(), hub_logging.set_verbosity_error()  # no retry chatter: one line, ours
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vae = AutoencoderKL.from_pretrained(name, subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=False)
    except Exception as e:  # OSError offline or for a wrong folder, ValueError for a bad id, ...
        where = f"'{name}'" + (f" (subfolder '{subfolder}')" if subfolder else "")
        local = os.path.basename(name.rstrip("/")) or "vae"
        raise ValueError(f"cannot load the VAE {where}: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]} "
                         f"Offline? Download it where there is a network (hf download {name} --local-dir {local}), "
                         f"copy the folder here and pass it: --vae {local}") from None
    finally:
        diffusers_logging.set_verbosity(levels[0]), hub_logging.set_verbosity(levels[1])
    return vae.to(device).eval().requires_grad_(False)


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


def latent_mosaic(lat, real):
    """(N, 4, h, w) latents -> (N, 1, 2h, 2w) grayscale: the 4 channels as a 2x2 mosaic, each channel's real mean
    +- 3 std (from the real latents `real`) -> [-1, 1], so generated latents are shown on the data's scale."""
    mean, std = real.mean((0, 2, 3), keepdim=True), real.std((0, 2, 3), keepdim=True) + 1e-6
    x = ((lat - mean) / (3 * std)).clamp(-1, 1)
    if x.shape[1] < 4:
        x = torch.cat([x, -torch.ones_like(x[:, :4 - x.shape[1]])], 1)
    return torch.cat([torch.cat([x[:, 0:1], x[:, 1:2]], 3), torch.cat([x[:, 2:3], x[:, 3:4]], 3)], 2)

# -----------------------------------------------------------------------------
# evaluation: our own domain classifier on latents, trained on the training split, and figures in its feature
# space. These are not Inception FID or LPIPS: they compare runs of this project with each other.

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


class DomainClassifier(nn.Module):
    """A small conv net that predicts a latent's domain; its penultimate layer (64 ReLU features) is the
    evaluation's feature space."""

    def __init__(self, channels=4, num_domains=2, width=32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, 1, 1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * width, 64), nn.ReLU())
        self.head = nn.Linear(64, num_domains)

    def forward(self, x):  # (B, C, H, W) scaled latents -> features (B, 64), logits (B, domains)
        f = self.features(x)
        return f, self.head(f)


def train_domain_classifier(x, y, num_domains, device, batch_size=128, min_steps=600, min_epochs=3, seed=0):
    """Train the DomainClassifier on latents x with domain labels y, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
        torch.manual_seed(seed)
        clf = DomainClassifier(x.shape[1], num_domains).to(device)
        opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
        steps_per_epoch = max(1, len(x) // batch_size)
        for s in range(max(min_steps, min_epochs * steps_per_epoch)):
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
# config: the flags carry seed 001's config names

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--data", default="data/latents.pt", help="latents .pt made by encode_latents.py (default data/latents.pt)")
    p.add_argument("--latent_scale", type=float, default=0.18215, help="the latents are multiplied by this (seed 001: 0.18215, SD 1.x)")
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of each domain held out from training, for samples "
                                                                     "and evaluation (default 0.05)")
    # model
    p.add_argument("--style_dim", type=int, default=64, help="style code size (default 64)")
    p.add_argument("--latent_dim", type=int, default=16, help="size of the mapping network's z (default 16)")
    p.add_argument("--g_dim", type=int, default=256, help="generator width (default 256)")
    p.add_argument("--g_blocks", type=int, default=6, help="generator residual blocks, half IN-encoder, half AdaIN-decoder (default 6)")
    p.add_argument("--g_down", type=int, default=1, help="times the generator halves the latent size inside (default 1: 32 -> 16)")
    p.add_argument("--e_dim", type=int, default=128, help="style encoder base width, doubled per block up to 512 (default 128)")
    p.add_argument("--d_dim", type=int, default=128, help="discriminator base width, doubled per block up to 512 (default 128)")
    p.add_argument("--f_dim", type=int, default=512, help="mapping network width (default 512)")
    p.add_argument("--f_shared", type=int, default=3, help="mapping network shared layers (default 3)")
    # loss (seed 001's loss.* keys)
    p.add_argument("--w_adv", type=float, default=1.0, help="weight of g_adv (default 1)")
    p.add_argument("--w_sty", type=float, default=1.0, help="weight of sty, style reconstruction (default 1)")
    p.add_argument("--w_ds", type=float, default=1.0, help="initial weight of ds, diversity, subtracted from g_loss (default 1)")
    p.add_argument("--ds_decay_epochs", type=int, default=20, help="lambda_ds falls linearly from w_ds at epoch 1 to 0 at "
                                                                   "epoch ds_decay_epochs+1 (default 20; 0: no decay)")
    p.add_argument("--ds_margin", type=float, default=1.5, help="ds is clamped at this L1 distance (default 1.5; 0: no clamp)")
    p.add_argument("--w_cyc", type=float, default=1.0, help="weight of cyc, cycle consistency (default 1; raise it if content breaks)")
    p.add_argument("--w_id", type=float, default=1.0, help="weight of id, identity (default 1; 0 skips the term and logs it as 0)")
    p.add_argument("--w_r1", type=float, default=2.0, help="weight of the R1 penalty (default 2)")
    p.add_argument("--r1_interval", type=int, default=16, help="R1 every this many steps, its weight multiplied by it (default 16)")
    # schedule and optimizers
    p.add_argument("--epochs", type=int, default=100, help="epochs (default 100)")
    p.add_argument("--epoch_size", type=int, default=6144, help="SAMPLES per epoch; steps per epoch = epoch_size // batch_size (default 6144)")
    p.add_argument("--batch_size", type=int, default=64, help="latents per step (default 64)")
    p.add_argument("--max_iters", type=int, default=0, help="stop after this many steps in all (0: no limit)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of G, E and D (default 1e-4)")
    p.add_argument("--f_lr", type=float, default=1e-6, help="Adam learning rate of the mapping network F (default 1e-6)")
    p.add_argument("--betas", type=float, nargs=2, default=[0.0, 0.99], help="Adam betas (default 0 0.99)")
    p.add_argument("--weight_decay", type=float, default=1e-4, help="Adam weight decay (default 1e-4)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA beta of G, E and F, used for samples and evaluation (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    # I/O
    p.add_argument("--out_dir", default="out/latent_stargan", help="where log.json, samples/ and ckpt.pt go")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt; flags not given take the checkpoint's values")
    p.add_argument("--log_interval", type=int, default=50, help="print a progress line every this many steps")
    p.add_argument("--n_samples", type=int, default=4, help="source latents in the sample grids (default 4)")
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                   help="decode sample grids through the VAE named in the latents file (default on)")
    # evaluation (on the held-out latents, with the EMA networks)
    p.add_argument("--eval_interval", type=int, default=5, help="evaluate every this many epochs and at the end (0: never)")
    p.add_argument("--n_div", type=int, default=4, help="styles per source for the diversity figure div (default 4)")
    p.add_argument("--min_clf_acc", type=float, default=0.8, help="warn when the domain classifier's held-out accuracy is below this")
    # system
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:1, cpu, ...")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="autocast dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile G, E, F and D (default: on for CUDA, off for CPU)")
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
        except Exception as e:
            die(f"--resume: {path} cannot be loaded ({type(e).__name__}: {str(e).strip().splitlines()[0][:150]})")
        if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
            die(f"--resume: {path} is not a checkpoint of {SCRIPT}")
        for a in p._actions:  # parse again with no defaults: what is left was typed on the command line
            a.default = argparse.SUPPRESS
        given = vars(p.parse_args(argv))
        for k in ("style_dim", "latent_dim", "g_dim", "g_blocks", "g_down", "e_dim", "d_dim", "f_dim", "f_shared"):
            if k in given and given[k] != ckpt["config"][k]:
                die(f"--resume: --{k} {given[k]} differs from the checkpoint's {ckpt['config'][k]}; use a new --out_dir")
        for k, v in given.items():
            if k in ckpt["config"] and v != ckpt["config"][k] and k not in ("resume", "device", "compile", "dtype"):
                print(f"resume: --{k} changed from {ckpt['config'][k]} to {v}")
        cfg = {**ckpt["config"], **given, "resume": True}
    for k in ("epochs", "batch_size", "epoch_size", "r1_interval", "log_interval", "style_dim", "latent_dim", "g_dim",
              "e_dim", "d_dim", "f_dim", "f_shared", "n_samples"):
        if cfg[k] < 1:
            die(f"--{k} must be at least 1, got {cfg[k]}")
    if cfg["g_blocks"] < 2 or cfg["g_blocks"] % 2:
        die(f"--g_blocks must be even and at least 2 (half encoder, half decoder), got {cfg['g_blocks']}")
    if not 0 <= cfg["g_down"] <= cfg["g_blocks"] // 2:
        die(f"--g_down must be between 0 and g_blocks/2 = {cfg['g_blocks'] // 2}, got {cfg['g_down']}")
    if cfg["epoch_size"] < cfg["batch_size"]:
        die(f"--epoch_size counts samples: {cfg['epoch_size']} is less than one batch of {cfg['batch_size']}")
    for k in ("lr", "f_lr", "latent_scale"):
        if not cfg[k] > 0:
            die(f"--{k} must be positive, got {cfg[k]}")
    if cfg["eval_interval"] and cfg["val_fraction"] <= 0:
        die("evaluation needs held-out latents: give --val_fraction > 0, or --eval_interval 0 to skip it")
    if cfg["n_div"] < 2:
        die(f"--n_div must be at least 2 (div compares outputs pairwise), got {cfg['n_div']}")
    for k in ("w_adv", "w_sty", "w_ds", "w_cyc", "w_id", "w_r1", "ds_margin", "weight_decay", "ds_decay_epochs", "max_iters",
              "eval_interval"):
        if cfg[k] < 0:
            die(f"--{k} must be zero or positive, got {cfg[k]}")
    if not 0 <= cfg["val_fraction"] < 1:
        die(f"--val_fraction must be in [0, 1), got {cfg['val_fraction']}")
    if not (0 <= cfg["ema"] < 1 and all(0 <= b < 1 for b in cfg["betas"])):
        die(f"--ema and --betas must be in [0, 1), got {cfg['ema']} and {cfg['betas']}")
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
    B = cfg["batch_size"]
    # various inits, derived attributes, I/O setup
    device = torch.device(cfg["device"])
    device_type = device.type
    torch.manual_seed(cfg["seed"])
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convolutions on Ampere and later
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = device_type == "cuda"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
    os.makedirs(os.path.join(cfg["out_dir"], "samples"), exist_ok=True)
    log_path, ckpt_path = os.path.join(cfg["out_dir"], "log.json"), os.path.join(cfg["out_dir"], "ckpt.pt")

    # data: every latent on the device, scaled once (seed 001: content * latent_scale, x_ref * latent_scale)
    try:
        meta = load_latents(cfg["data"])
    except ValueError as e:
        die(str(e))
    if abs(cfg["latent_scale"] - float(meta.get("scaling_factor", cfg["latent_scale"]))) > 1e-6:
        print(f"warning: --latent_scale {cfg['latent_scale']} differs from the scaling_factor {meta['scaling_factor']} of the "
              f"VAE that made {cfg['data']}", file=sys.stderr)
    domains, K = list(meta["domains"]), len(meta["domains"])
    latents = meta["latents"].float().mul_(cfg["latent_scale"]).to(device)
    labels = meta["labels"].long().to(device)
    C, H, W = latents.shape[1:]
    # a fixed held-out split per domain (same for every seed, so runs compare): training never sees it
    split_gen, train_idx, val_idx = torch.Generator().manual_seed(1234), [], []
    for d in range(K):
        idx = torch.nonzero(meta["labels"] == d).flatten()
        idx = idx[torch.randperm(len(idx), generator=split_gen)]
        n_val = math.ceil(cfg["val_fraction"] * len(idx)) if cfg["val_fraction"] > 0 else 0
        n_val = min(len(idx) // 2, max(n_val, 2)) if n_val else 0  # at least 2 held out (a covariance), half at most
        val_idx.append(idx[:n_val]), train_idx.append(idx[n_val:])
    dom_count = torch.tensor([len(t) for t in train_idx], device=device)
    dom_start = torch.cumsum(dom_count, 0) - dom_count
    train_sorted = torch.cat(train_idx).to(device)  # training indices grouped by domain: x_ref is drawn from a group
    val_idx = torch.cat(val_idx).to(device)
    n_train = len(train_sorted)
    steps_per_epoch = cfg["epoch_size"] // B

    # model init
    G = Generator(C, cfg["g_dim"], cfg["style_dim"], cfg["g_blocks"], cfg["g_down"]).to(device)
    E = StyleEncoder(C, H, cfg["style_dim"], K, cfg["e_dim"]).to(device)
    Fm = MappingNetwork(cfg["latent_dim"], cfg["style_dim"], K, cfg["f_dim"], cfg["f_shared"]).to(device)
    D = Discriminator(C, H, K, cfg["d_dim"]).to(device)
    G_ema, E_ema, F_ema = copy.deepcopy(G).eval(), copy.deepcopy(E).eval(), copy.deepcopy(Fm).eval()
    nets, emas = [G, E, Fm], [G_ema, E_ema, F_ema]
    gef_params = [p for m in nets for p in m.parameters()]

    # optimizers: one fused Adam for G, E and F (F at its own lr), one for D
    fused = dict(fused=True)
    opt_G = torch.optim.Adam([{"params": list(G.parameters()) + list(E.parameters()), "lr": cfg["lr"]},
                              {"params": list(Fm.parameters()), "lr": cfg["f_lr"]}],
                             betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"], **fused)
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"], **fused)
    scaler_G = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))
    scaler_D = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))

    # the log, and the state a checkpoint restores
    keys = ["d_loss", "g_loss", "g_adv", "sty", "ds", "cyc", "id", "r1", "d_real", "d_fake"]
    log = {"script": SCRIPT, "config": cfg, "records": []}
    step, epoch, sums, elapsed = 0, 1, None, 0.0
    if ckpt is not None:
        try:
            for name, m in (("G", G), ("E", E), ("F", Fm), ("D", D), ("G_ema", G_ema), ("E_ema", E_ema), ("F_ema", F_ema)):
                m.load_state_dict(ckpt[name])
            opt_G.load_state_dict(ckpt["opt_G"]), opt_D.load_state_dict(ckpt["opt_D"])
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. --data with another number of domains
            die(f"--resume: {ckpt_path} does not fit this run ({' '.join(str(e).split())[:220]}); "
                "resume with the data and flags it was made with, or use a new --out_dir")
        scaler_G.load_state_dict(ckpt["scaler_G"]), scaler_D.load_state_dict(ckpt["scaler_D"])
        for opt, lrs in ((opt_G, (cfg["lr"], cfg["f_lr"])), (opt_D, (cfg["lr"],))):  # the flags win over the saved lr
            for group, lr in zip(opt.param_groups, lrs):
                group.update(lr=lr, betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"])
        step, epoch, sums, elapsed = ckpt["step"], ckpt["epoch"], ckpt["sums"], ckpt["elapsed"]
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

    # compile: keep the raw modules for checkpoints, EMA, samples and R1's double backward
    G_c, E_c, F_c, D_c = G, E, Fm, D
    if cfg["compile"]:
        G_c, E_c, F_c, D_c = (torch.compile(m, dynamic=False) for m in (G, E, Fm, D))

    # samples: fixed held-out sources and references, one fixed z per domain; decoded through the VAE if it loads
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    val_labels = labels[val_idx] if len(val_idx) else labels[train_sorted]
    pool = val_idx if len(val_idx) else train_sorted
    src = pool[torch.randperm(len(pool), generator=gen)[:cfg["n_samples"]].to(device)]
    refs = torch.stack([pool[torch.nonzero(val_labels == d).flatten()[0]] for d in range(K)])  # one reference per domain
    z_fixed = torch.randn(K, cfg["latent_dim"], generator=gen).to(device)
    vae, vae_note = None, None
    if cfg["decode"] and meta.get("vae"):
        try:
            vae = load_vae(meta["vae"], meta.get("subfolder"), device, torch.bfloat16 if device_type == "cuda" else torch.float32)
        except ValueError as e:
            vae_note = str(e)
    if vae is None:
        print("samples: " + (f"{vae_note.split(' Offline?')[0]}; " if vae_note else "") +
              "saving each latent's 4 channels as a 2x2 grayscale mosaic instead of decoded images")

    @torch.no_grad()
    def save_samples(tag):
        """Reference-guided (rows: sources, columns: one reference per domain) and latent-guided (rows: sources,
        columns: each domain) grids from the EMA networks, first column and first row the inputs."""
        Gs, Es, Fs = (G_ema, E_ema, F_ema) if cfg["ema"] > 0 else (G, E, Fm)
        for m in (Gs, Es, Fs):
            m.eval()
        x_src, x_ref, y_ref = latents[src], latents[refs], labels[refs]
        n, ar = len(x_src), torch.arange(K, device=device)
        with ctx:
            s_ref = Es(x_ref, y_ref)
            ref_out = Gs(x_src.repeat_interleave(K, 0), s_ref.repeat(n, 1)).float()
            lat_out = Gs(x_src.repeat_interleave(K, 0), Fs(z_fixed, ar).repeat(n, 1)).float()
        for m in (G, E, Fm):
            m.train()
        blank = torch.full_like(x_src[:1], float("nan"))
        grids = {"ref": torch.cat([blank, x_ref] + [torch.cat([x_src[i:i + 1], ref_out[i * K:(i + 1) * K]]) for i in range(n)]),
                 "lat": torch.cat([torch.cat([x_src[i:i + 1], lat_out[i * K:(i + 1) * K]]) for i in range(n)])}
        for kind, cells in grids.items():
            empty = torch.isnan(cells).flatten(1).any(1)
            cells = torch.nan_to_num(cells)
            if vae is not None:  # unscale, decode in chunks
                imgs = torch.cat([vae.decode((c / cfg["latent_scale"]).to(vae.dtype)).sample.float() for c in cells.split(16)])
                scale = 1
            else:
                imgs, scale = latent_mosaic(cells, torch.cat([x_src, x_ref])), max(1, 128 // (2 * H))
            imgs[empty] = -1  # the top-left corner of the reference grid is black
            save_grid(imgs, os.path.join(cfg["out_dir"], "samples", f"{kind}_{tag}.png"), nrow=K + 1, scale=scale)

    def save_checkpoint():
        state = {"script": SCRIPT, "config": cfg, "step": step, "epoch": epoch, "sums": sums,
                 "elapsed": elapsed + time.perf_counter() - t_start,
                 "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                 "scaler_G": scaler_G.state_dict(), "scaler_D": scaler_D.state_dict(),
                 "rng_cpu": torch.get_rng_state(), "rng_cuda": torch.cuda.get_rng_state(device) if device_type == "cuda" else None}
        for name, m in (("G", G), ("E", E), ("F", Fm), ("D", D), ("G_ema", G_ema), ("E_ema", E_ema), ("F_ema", F_ema)):
            state[name] = m.state_dict()
        save_torch_atomic(state, ckpt_path)

    # evaluation: the domain classifier is trained the first time it is needed and cached in out_dir, keyed by the data
    ev = {"ref_logged": any("clf_acc" in r for r in log["records"])}

    def _setup_eval():
        digest = hashlib.sha1(meta["latents"].numpy().tobytes() + meta["labels"].numpy().tobytes()
                              + f"{cfg['val_fraction']} DomainClassifier 32".encode()).hexdigest()[:16]
        path = os.path.join(cfg["out_dir"], f"classifier_{digest}.pt")
        val, y_val = val_idx.cpu().numpy(), labels[val_idx].cpu().numpy()
        if os.path.exists(path):
            saved_clf = torch.load(path, map_location=device, weights_only=True)
            clf = DomainClassifier(C, K).to(device)
            clf.load_state_dict(saved_clf["state"])
            clf.eval().requires_grad_(False)
            f_all, _ = embed(clf, latents)
            acc = saved_clf["acc"]
        else:
            t = time.perf_counter()
            clf = train_domain_classifier(latents[train_sorted], labels[train_sorted], K, device)
            f_all, p_all = embed(clf, latents)
            acc = float((p_all[val].argmax(1) == y_val).mean())
            save_torch_atomic({"state": clf.state_dict(), "acc": acc, "digest": digest}, path)
            print(f"evaluation classifier: trained in {time.perf_counter() - t:.0f}s on {n_train} latents, held-out accuracy "
                  f"{acc:.3f}; cached in {path}")
        if acc < cfg["min_clf_acc"]:
            print(f"warning: the domain classifier's held-out accuracy is {acc:.3f} (< --min_clf_acc {cfg['min_clf_acc']}): "
                  "acc_ref, acc_lat and fd mean little with it", file=sys.stderr)
        real = [gaussian(f_all[(meta["labels"] == d).numpy()]) for d in range(K)]  # every real latent of each domain
        f_val = f_all[val]
        fd_real = np.mean([frechet_distance(*gaussian(f_val[y_val == d]), *real[d]) for d in range(K)])
        ev.update(clf=clf, real=real, ref={"clf_acc": acc, "fd_real": float(fd_real)})

    def setup_eval():
        # building (or loading) the classifier draws weight inits: fork the RNG so training's stays as it was,
        # whether the classifier is trained here or loaded on resume
        with torch.random.fork_rng(devices=[device] if device_type == "cuda" else []):
            _setup_eval()

    @torch.no_grad()
    def evaluate():
        """On the held-out latents, with the EMA networks: each source into every other domain, by a reference (a
        held-out latent of that domain) and by a fixed z. acc_ref, acc_lat: share classified as the target domain;
        fd_<domain>, fd_mean: latent-guided translations into a domain against its real latents; div: mean pairwise
        L1 of n_div styles per source; cyc_err: L1 of the latent-guided round trip."""
        if "clf" not in ev:
            setup_eval()
        Gs, Es, Fs = (G_ema, E_ema, F_ema) if cfg["ema"] > 0 else (G, E, Fm)
        for m_ in (Gs, Es, Fs):
            m_.eval()
        gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 2)  # its own RNG: training's is untouched
        x, y = latents[val_idx], labels[val_idx]
        y_t = torch.cat([(y + k) % K for k in range(1, K)])  # every source into every other domain
        x_s, y_s = x.repeat(K - 1, 1, 1, 1), y.repeat(K - 1)
        per_dom = [val_idx[labels[val_idx] == d] for d in range(K)]
        refs = torch.stack([per_dom[t][torch.randint(len(per_dom[t]), (), generator=gen, device=device)] for t in y_t.tolist()])
        z = torch.randn(len(x_s), cfg["latent_dim"], generator=gen, device=device)
        fake_ref, fake_lat, rec = [], [], []
        for i in range(0, len(x_s), 256):
            sl = slice(i, i + 256)
            with ctx:
                fr = Gs(x_s[sl], Es(latents[refs[sl]], y_t[sl])).float()
                fl = Gs(x_s[sl], Fs(z[sl], y_t[sl])).float()
                rc = Gs(fl, Es(x_s[sl], y_s[sl])).float()
            fake_ref.append(fr), fake_lat.append(fl), rec.append(rc)
        fake_ref, fake_lat, rec = torch.cat(fake_ref), torch.cat(fake_lat), torch.cat(rec)
        div = []
        for i in range(0, len(x), 256):  # n_div styles for each source, into one other domain
            xs, ys = x[i:i + 256], y_t[i:min(i + 256, len(x))]  # y_t's first len(x) entries: (y + 1) % K
            zs = torch.randn(cfg["n_div"], len(xs), cfg["latent_dim"], generator=gen, device=device)
            with ctx:
                outs = torch.stack([Gs(xs, Fs(zs[j], ys)).float() for j in range(cfg["n_div"])])
            pairs = [(a, b) for a in range(cfg["n_div"]) for b in range(a + 1, cfg["n_div"])]
            div.append(torch.stack([(outs[a] - outs[b]).abs().flatten(1).mean(1) for a, b in pairs]).mean(0))
        for m_ in (G, E, Fm):
            m_.train()
        t = y_t.cpu().numpy()
        f_lat, p_lat = embed(ev["clf"], fake_lat)
        _, p_ref = embed(ev["clf"], fake_ref)
        out = {"acc_ref": float((p_ref.argmax(1) == t).mean()), "acc_lat": float((p_lat.argmax(1) == t).mean())}
        fds = {f"fd_{d}": frechet_distance(*gaussian(f_lat[t == k]), *ev["real"][k]) for k, d in enumerate(domains)}
        out.update(fds)
        out["fd_mean"] = float(np.mean(list(fds.values())))
        out["div"] = float(torch.cat(div).mean())
        out["cyc_err"] = float((rec - x_s).abs().mean())
        print(f"eval epoch {epoch}: acc_ref {out['acc_ref']:.3f} acc_lat {out['acc_lat']:.3f} fd_mean {out['fd_mean']:.3f} "
              f"(real held-out latents {ev['ref']['fd_real']:.3f}) div {out['div']:.4f} cyc_err {out['cyc_err']:.4f}")
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
    buf = torch.zeros(cfg["log_interval"], len(keys), device=device)
    zero = torch.zeros((), device=device)
    pending, isums = [], np.zeros(len(keys) + 1)
    saved = {"step": step if ckpt is not None else None}

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
                   else "No checkpoint was written yet") + "; lower --lr or raise --w_r1")
        s = rows.sum(0)
        sums = s.tolist() if sums is None else [a + b for a, b in zip(sums, s.tolist())]  # plain floats: weights_only loads
        isums = isums + np.append(s, len(rows))
        pending.clear()

    print(f"{', '.join(domains)}: {n_train} training and {len(val_idx)} held-out latents {C}x{H}x{W}, {steps_per_epoch} "
          f"steps/epoch, {total_steps} steps, device {device} {cfg['dtype']}{' compiled' if cfg['compile'] else ''}")
    start_step = step
    t_start = time.perf_counter()
    t_interval = t_epoch = t_start
    bench_t0, paused = None, 0.0
    while step < total_steps:
        # -------------------------------------------------------------------------
        # one training step (seed 001)
        lam = lambda_ds(epoch, cfg["w_ds"], cfg["ds_decay_epochs"])
        idx = train_sorted[torch.randint(n_train, (B,), device=device)]
        content, y_src = latents[idx], labels[idx]
        y_trg = (y_src + torch.randint(1, K, (B,), device=device)) % K  # uniform over the other domains
        pick = (torch.rand(B, device=device) * dom_count[y_trg]).long().clamp_max(dom_count[y_trg] - 1)
        x_ref = latents[train_sorted[dom_start[y_trg] + pick]]  # a reference from the target domain
        z_trg, z_2 = torch.randn(2, B, cfg["latent_dim"], device=device)
        # styles and fakes, once, before D's update. Calls are batched along dim 0: G, E and D have no batch-
        # dependent layers (instance norm is per sample), so this computes the same numbers as separate calls.
        # (D's spectral norm takes one power-iteration step per call: one for the batch instead of one each.)
        # ds's two draws: like StarGAN v2, z_1 is the latent path's z_trg, so fake_1 is fake_lat.
        with ctx:
            s_ref, s_src = E_c(torch.cat([x_ref, content]), torch.cat([y_trg, y_src])).chunk(2)
            s_lat, s_2 = F_c(torch.cat([z_trg, z_2]), torch.cat([y_trg, y_trg])).chunk(2)
            fake_ref, fake_lat, fake_2 = G_c(content.repeat(3, 1, 1, 1), torch.cat([s_ref, s_lat, s_2])).chunk(3)

        # D step: hinge on the ref and latent paths, averaged; R1 every r1_interval steps with interval compensation
        with ctx:
            real_logits, fr_logits, fl_logits = D_c(torch.cat([x_ref, fake_ref.detach(), fake_lat.detach()]),
                                                    y_trg.repeat(3)).float().chunk(3)
        d_loss = 0.5 * (d_hinge_loss(real_logits, fr_logits) + d_hinge_loss(real_logits, fl_logits))
        r1 = zero
        if step % cfg["r1_interval"] == 0 and cfg["w_r1"] > 0:
            x_ref_r1 = x_ref.detach().requires_grad_(True)
            with torch.autocast(device_type=device_type, enabled=False):  # seed 001: autocast off, float32
                r1 = r1_penalty(D(x_ref_r1.float(), y_trg), x_ref_r1)  # the raw D: compiled graphs have no double backward
            d_loss = d_loss + (cfg["w_r1"] * cfg["r1_interval"]) * r1
        opt_D.zero_grad(set_to_none=True)
        scaler_D.scale(d_loss).backward()
        scaler_D.step(opt_D)
        scaler_D.update()

        # G step: G, E and F together, against the updated D
        with ctx:
            adv_ref, adv_lat = D_c(torch.cat([fake_ref, fake_lat]), y_trg.repeat(2)).float().chunk(2)
            g_adv = g_adversarial_loss(adv_ref) + g_adversarial_loss(adv_lat)
            s_ref_hat, s_lat_hat = E_c(torch.cat([fake_ref, fake_lat]), y_trg.repeat(2)).float().chunk(2)
            sty = style_reconstruction_loss(s_ref_hat, s_ref.float()) + style_reconstruction_loss(s_lat_hat, s_lat.float())
            ds = diversity_sensitive_loss(fake_lat.float(), fake_2.float(), cfg["ds_margin"] or None)
            back = [fake_ref, fake_lat] + ([content] if cfg["w_id"] > 0 else [])  # cyc_ref, cyc_lat and id in one call
            outs = G_c(torch.cat(back), s_src.repeat(len(back), 1)).float().chunk(len(back))
            cyc = cycle_consistency_loss(outs[0], content) + cycle_consistency_loss(outs[1], content)
            idl = identity_loss(outs[2], content) if cfg["w_id"] > 0 else zero
        g_loss = cfg["w_adv"] * g_adv + cfg["w_sty"] * sty + cfg["w_cyc"] * cyc + cfg["w_id"] * idl - lam * ds
        opt_G.zero_grad(set_to_none=True)
        scaler_G.scale(g_loss).backward(inputs=gef_params)  # grads for G, E, F only: D's are not needed here
        scaler_G.step(opt_G)
        scaler_G.update()
        if cfg["ema"] > 0:
            with torch.no_grad():
                for m, m_ema in zip(nets, emas):
                    torch._foreach_lerp_(list(m_ema.parameters()), list(m.parameters()), 1 - cfg["ema"])
        buf[len(pending)] = torch.stack([d_loss.detach(), g_loss.detach(), g_adv.detach(), sty.detach(), ds.detach(),
                                         cyc.detach(), idl.detach(), r1.detach(), real_logits.detach().mean(),
                                         torch.cat([fr_logits, fl_logits]).detach().mean()])
        pending.append(step)
        step += 1

        # -------------------------------------------------------------------------
        # progress line, end of epoch: log record, samples, checkpoint
        if step == start_step + WARMUP_STEPS:
            flush()  # a sync, so the clock starts after the warm-up's work is done
            bench_t0, paused = time.perf_counter(), 0.0
        if len(pending) == cfg["log_interval"]:
            flush()
        if step % cfg["log_interval"] == 0:
            flush()
            now = time.perf_counter()
            m = isums[:-1] / max(isums[-1], 1)
            print(f"epoch {epoch}/{cfg['epochs']} step {step}/{total_steps} | "
                  + " ".join(f"{k} {v:.4f}" for k, v in zip(keys, m)) + f" | lambda_ds {lam:.3f} | "
                  f"{isums[-1] * B / (now - t_interval):.0f} img/s", flush=True)
            t_interval, isums = now, np.zeros(len(keys) + 1)
        end_of_epoch = step % steps_per_epoch == 0
        last_step = step == total_steps or stop["signal"]
        if end_of_epoch or last_step:
            flush()
            t0 = time.perf_counter()
            epoch_start = (epoch - 1) * steps_per_epoch
            record = {"epoch": epoch, "step": step}
            record.update({k: sums[j] / (step - epoch_start) for j, k in enumerate(keys)})
            record["lambda_ds"] = lam
            record["imgs_per_sec"] = (step - max(epoch_start, start_step)) * B / max(t0 - t_epoch, 1e-9)
            record["time"] = elapsed + t0 - t_start
            if not end_of_epoch:
                record["partial"] = True  # the epoch goes on after a resume, and this record is then replaced
            if cfg["eval_interval"] and (step == total_steps or (end_of_epoch and epoch % cfg["eval_interval"] == 0)):
                record.update(evaluate())  # evaluation figures join the record of their epoch
            log["records"].append(record)
            save_json_atomic(log, log_path)
            save_samples(f"epoch{epoch:03d}" if end_of_epoch else f"step{step:06d}")
            if end_of_epoch:
                epoch, sums = epoch + 1, None
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
    if stop["signal"]:
        print(f"interrupted at step {step}: checkpoint saved to {ckpt_path}; continue with --resume --out_dir {cfg['out_dir']}")
    else:
        print(f"done: {step} steps; samples in {os.path.join(cfg['out_dir'], 'samples')}; log in {log_path}")
    if rate is not None and step > start_step + WARMUP_STEPS:
        print(f"{SCRIPT}: {rate:.1f} img/s (steps {start_step + WARMUP_STEPS}..{step}, training loop only)")


if __name__ == "__main__":
    main()
