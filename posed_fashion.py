"""Posed Fashion-MNIST: the experiments behind docs/, and the data and judges of the pose test.

Fashion-MNIST has no pose (every garment is centred, every shoe faces left) and little style inside
a class, so this poses it: each image takes one of two poses (mirror: facing; shift: side; scale:
size) and, independently, one of two styles (dim: brightness; stripes: a texture), each drawn by a
seeded coin in every class alike, and its file name says which. A tiny AutoencoderKL trained on the
images gives latents a person can decode; small conv nets fitted on real images decoded through the
same VAE judge what a run's translations kept. test_scripts.py imports it; the docs run it:

    python posed_fashion.py images DIR [CLASSES [POSE [STYLE]]]   # the posed (and styled) PNGs
    python posed_fashion.py vae DIR [MINUTES]        # a VAE trained on Fashion-MNIST (8 minutes)
    python posed_fashion.py tiny-vae DIR             # a random tiny VAE, seconds
    python posed_fashion.py case DIR [CLASSES [POSE [STYLE [SEED [FLAGS...]]]]]   # the test's run
    python posed_fashion.py vae-moves VAE_DIR        # moving a latent against moving its image
    python posed_fashion.py pose-lane DIR            # the pose test's data and run, in JSON

Unlike the four scripts it imports two of them (their loaders, networks and evaluation helpers):
it is a lab, not a tool a user forks.
"""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
FASHION = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
TINY_VAE = dict(
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=64,
)


def run(script, *args, timeout=300):
    """Run a script of the project; raise with its output's end if it fails."""
    cmd = [sys.executable, os.path.join(HERE, script), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(
            f"{script} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def load_pt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def load_log(out_dir):
    with open(os.path.join(out_dir, "log.json")) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# VAEs: a random one decodes any latent to noise; a trained one decodes to clothes a judge can read


def save_tiny_vae(folder, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**TINY_VAE).save_pretrained(folder)
    return folder


def train_vae(x, steps=None, minutes=None, seed=0, batch=32):
    """TINY_VAE trained on images x (uint8 (N, 3, size, size)): Adam on the pixel MSE plus 1e-6
    times the KL to N(0, 1) (Stable Diffusion's VAE weights its KL so), for `steps` steps or
    `minutes` of wall time. Its scaling_factor is set to 1 / std of its latents, as SD's is.
    Returns (the VAE, the steps it took)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    t0, step = time.perf_counter(), 0
    while step < (steps or math.inf) and (
        minutes is None or time.perf_counter() - t0 < 60 * minutes
    ):
        xb = x[torch.randint(len(x), (batch,))].float() / 127.5 - 1
        dist = vae.encode(xb).latent_dist
        rec = vae.decode(dist.sample()).sample
        loss = torch.nn.functional.mse_loss(rec, xb) + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            print(
                f"step {step}: loss {loss.item():.5f} ({time.perf_counter() - t0:.0f}s)", flush=True
            )
    vae.eval()
    with torch.no_grad():
        z = torch.cat(
            [vae.encode(c.float() / 127.5 - 1).latent_dist.mean for c in x[:2048].split(256)]
        )
    vae.register_to_config(scaling_factor=float(1 / z.std()))
    return vae, step


def train_fashion_vae(folder, minutes=8.0, images=FASHION, size=64, n_images=20000, seed=0):
    """train_vae on Fashion-MNIST's training images, preprocessed as encode_latents.py does at
    --size 64, for `minutes` of wall time. Kept in folder (with train_info.json) and reused when
    the folder already holds one made with the same settings."""
    import encode_latents as enc

    settings = dict(minutes=minutes, size=size, n_images=n_images, seed=seed, vae=TINY_VAE)
    info_path = os.path.join(folder, "train_info.json")
    settings = json.loads(json.dumps(settings))  # as the JSON file holds them: lists, not tuples
    if os.path.exists(info_path) and json.load(open(info_path))["settings"] == settings:
        print(f"{folder} holds a VAE trained with these settings: kept")
        return folder
    import train_mnist_gan as mnist

    arrays = mnist.load_dataset("fashion", images)  # the four IDX files, raw or .gz
    torch.manual_seed(seed)
    pick = torch.randperm(len(arrays[0]))[:n_images]
    x = torch.stack(
        [enc.to_square(Image.fromarray(arrays[0][i], mode="L"), size) for i in pick.tolist()]
    )
    x_test = torch.stack(
        [enc.to_square(Image.fromarray(a, mode="L"), size) for a in arrays[2][:256]]
    )
    t0 = time.perf_counter()
    vae, step = train_vae(x, minutes=minutes, seed=seed)
    with torch.no_grad():
        xt = x_test.float() / 127.5 - 1
        rec = vae.decode(vae.encode(xt).latent_dist.mean).sample.clamp(-1, 1)
        mse = ((rec - xt) / 2).pow(2).mean().item()
    vae.save_pretrained(folder)
    psnr = 10 * np.log10(1 / mse)
    scaling = vae.config.scaling_factor
    info = dict(
        settings=settings,
        steps=step,
        seconds=time.perf_counter() - t0,
        test_psnr=psnr,
        scaling_factor=scaling,
    )
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    print(f"wrote {folder}: {step} steps, test PSNR {psnr:.1f} dB, scaling_factor {scaling:.3f}")
    return folder


def vae_moves(vae_dir, n=512, images=FASHION):
    """How far moving a latent is from moving its image, for a VAE at 64 px on Fashion-MNIST's
    first n test images (docs/pose.md's figures): PSNRs (images in [-1, 1]) of the
    reconstruction against the image, of decode(mirrored z) against the mirrored decode(z), and
    of decode(z shifted 1 latent pixel) against decode(z) shifted 8 pixels."""
    import train_latent_stargan as sg
    import train_mnist_gan as mnist

    test = mnist.load_dataset("fashion", images)[2][:n]
    x = torch.from_numpy(np.stack([np.asarray(posed(a, "mirror", 0, 64)) for a in test]))
    x = x[:, None].repeat(1, 3, 1, 1).float() / 127.5 - 1
    vae = sg.load_vae(vae_dir, None, torch.device("cpu"), torch.float32)

    def psnr(a, b):
        return float(10 * torch.log10(4 / (a - b).pow(2).mean()))

    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        out = [vae.decode(v).sample.clamp(-1, 1) for v in (z, z.flip(-1), z.roll(1, -1))]
    mirror, shift = psnr(out[1], out[0].flip(-1)), psnr(out[2][..., 8:], out[0][..., :-8])
    return (
        f"{vae_dir}: reconstruction {psnr(out[0], x):.1f} dB; decode(mirrored z) against the "
        f"mirrored decode(z) {mirror:.1f} dB; decode(z shifted 1 latent pixel) against decode(z) "
        f"shifted 8 pixels {shift:.1f} dB"
    )


def leak_check(run_dir, lat_path, vae_dir, seed=0):
    """Whether a run's outputs come out augmented, on decoded images of shoes that all face left
    (Fashion-MNIST as it comes): the share judged mirrored, by a judge fitted on real images and
    their mirrors, of held-out real images and of translations by z; and the mean horizontal
    centre of brightness (0 left, 1 right) of each. A mirror or a translation that leaks moves
    them off the real data's."""
    import train_latent_stargan as sg

    cpu = torch.device("cpu")
    ckpt, data = load_pt(os.path.join(run_dir, "ckpt.pt")), load_pt(lat_path)
    cfg, scale = ckpt["config"], ckpt["config"]["latent_scale"]
    (G, _, F_), _ = sg.run_networks(cfg, ckpt, cpu)
    vae = sg.load_vae(vae_dir, None, cpu, torch.float32)
    lat, labels, K = data["latents"].float() * scale, data["labels"], len(data["domains"])
    train, held = (torch.cat(t) for t in sg.split_domains(labels, K, cfg["val_fraction"]))
    gen = torch.Generator().manual_seed(seed)

    def images(latents):
        with torch.no_grad():
            return torch.cat(
                [sg.decode(vae, c, scale).mean(1, keepdim=True) for c in latents.split(256)]
            )

    fit_on = images(lat[train[torch.randperm(len(train), generator=gen)[:2000]]])
    x = torch.cat([fit_on, fit_on.flip(-1)])
    y = torch.arange(2).repeat_interleave(len(fit_on))
    judge = sg.train_classifier(lambda: Judge(2), x, y, cpu, min_steps=600, seed=seed)
    y_trg = (labels[held] + torch.randint(1, K, (len(held),), generator=gen)) % K
    z = torch.randn(len(held), cfg["latent_dim"], generator=gen)
    with torch.no_grad():
        fakes = images(G(lat[held], F_(z, y_trg)))
    real = images(lat[held])
    out = {}
    for name, img in (("real", real), ("fake", fakes)):
        with torch.no_grad():
            out[f"mirrored_{name}"] = float(judge(img)[1].argmax(1).float().mean())
        w = (img + 1).clamp_min(0).sum((1, 2))  # brightness per column
        centre = (w * torch.linspace(0, 1, w.shape[-1])).sum(1) / w.sum(1)
        out[f"x_centre_{name}"] = float(centre.mean())
    return out


# -----------------------------------------------------------------------------
# posed images, the judges, and the pose test's run

FASHION_NAMES = "tshirt trouser pullover dress coat sandal shirt sneaker bag boot".split()


def posed(a28, pose, which, size):
    """A 28x28 uint8 garment in pose `which` (0 or 1), as a size x size grayscale PIL image.
    mirror: as it comes (shoes face left), or mirrored. shift: shrunk to 69% of the frame, at its
    left or right edge. scale: shrunk to 55% of the frame, or the whole frame; centred."""
    img = Image.fromarray(a28, mode="L")
    if pose == "mirror":
        img = img.resize((size, size), Image.BICUBIC)
        return img.transpose(Image.FLIP_LEFT_RIGHT) if which else img
    side = round(size * {"shift": 0.69, "scale": (0.55, 1.0)[which]}[pose])
    canvas = Image.new("L", (size, size), 0)
    left = (size - side) * which if pose == "shift" else (size - side) // 2
    canvas.paste(img.resize((side, side), Image.BICUBIC), (left, (size - side) // 2))
    return canvas


def styled(img, style, which):
    """A posed PIL image in style `which`: 0 as it is, 1 changed. dim: the garment at 45% of its
    brightness. stripes: every other band of an eighth of the rows at 40% of its brightness."""
    if not which:
        return img
    a = np.asarray(img, dtype=np.float32)
    if style == "dim":
        a = a * 0.45
    elif style == "stripes":
        a[(np.arange(len(a)) // (len(a) // 8)) % 2 == 1] *= 0.4
    else:
        raise ValueError(f"unknown style {style!r}: dim or stripes")
    return Image.fromarray(a.round().astype(np.uint8), mode="L")


def write_posed_fashion(folder, classes, pose, style=None, n=2000, size=64, seed=0, images=FASHION):
    """The first n training images of each Fashion-MNIST class, each in pose 0 or 1 and, with a
    style, in style 0 or 1 (independent fair coins, seeded), as PNGs folder/<class name>/<pose>_
    <index>.png, or <pose><style>_<index>.png: image folders for encode_latents.py. Returns
    (folder, their uint8 images (N, 3, size, size))."""
    import train_mnist_gan as mnist

    x, y = mnist.load_dataset("fashion", images)[:2]
    gen, gen_style, out = np.random.default_rng(seed), np.random.default_rng(seed + 1000), []
    for c in classes:
        os.makedirs(os.path.join(folder, FASHION_NAMES[c]), exist_ok=True)
        for i in np.flatnonzero(y == c)[:n]:
            which = int(gen.integers(2))
            img, name = posed(x[i], pose, which, size), f"{which}"
            if style:
                look = int(gen_style.integers(2))
                img, name = styled(img, style, look), f"{which}{look}"
            img.save(os.path.join(folder, FASHION_NAMES[c], f"{name}_{i:05d}.png"))
            out.append(np.asarray(img))
    return folder, torch.from_numpy(np.stack(out))[:, None].repeat(1, 3, 1, 1)


class Judge(torch.nn.Module):
    """A small conv net on decoded grayscale images: pose, class or style."""

    def __init__(self, n_out):
        super().__init__()
        conv = torch.nn.Conv2d
        self.features = torch.nn.Sequential(
            conv(1, 16, 5, 2, 2), torch.nn.ReLU(), conv(16, 32, 5, 2, 2), torch.nn.ReLU(),
            conv(32, 64, 3, 2, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
            torch.nn.Flatten(), torch.nn.Linear(64 * 16, 64), torch.nn.ReLU(),
        )  # fmt: skip
        self.head = torch.nn.Linear(64, n_out)

    def forward(self, x):
        f = self.features(x)
        return f, self.head(f)


def judge_data(lat_path, vae_dir, scale, val_fraction=0.05, seed=0):
    """The real side of the judging, a namespace: lat (the scaled latents), labels (domains), pose,
    style (None without a style coin), K (the number of domains), held (the held-out indices as
    the run splits them), images (latents to decoded grayscale images), fit_on (the judges' 3,000
    training images' indices) and gen (the seeded generator after drawing them)."""
    import train_latent_stargan as sg

    data, cpu = load_pt(lat_path), torch.device("cpu")
    vae = sg.load_vae(vae_dir, None, cpu, torch.float32)
    lat, labels = data["latents"].float() * scale, data["labels"]
    names = [os.path.basename(p) for p in data["paths"]]
    pose = torch.tensor([int(n[0]) for n in names])
    style = torch.tensor([int(n[1]) for n in names]) if names[0][1] != "_" else None
    K = len(data["domains"])
    train, held = (torch.cat(t) for t in sg.split_domains(labels, K, val_fraction))

    def images(latents):  # decoded, grayscale, (N, 1, size, size)
        with torch.no_grad():
            return sg.decode(vae, latents, scale).mean(1, keepdim=True)

    gen = torch.Generator().manual_seed(seed)
    fit_on = train[torch.randperm(len(train), generator=gen)[:3000]]
    return SimpleNamespace(lat=lat, labels=labels, pose=pose, style=style, K=K, held=held,
                           images=images, fit_on=fit_on, gen=gen)  # fmt: skip


def fit_judges(lat_path, vae_dir, names=("pose", "class", "style"), real=None, seed=0,
               val_fraction=0.05):  # fmt: skip
    """{name: judge} for each of names (pose, class, style) the latents file's names hold: a
    Judge fitted on 3,000 real training images decoded through the VAE, the training images of
    the run's split (val_fraction: the run's). The suite fits two in its own process and one in
    the lane (test_scripts.py's pose_lane)."""
    import train_latent_stargan as sg

    if real is None:
        from diffusers import AutoencoderKL

        scale = AutoencoderKL.load_config(vae_dir)["scaling_factor"]
        real = judge_data(lat_path, vae_dir, scale, val_fraction, seed)
    truth = {"pose": (real.pose, 2), "class": (real.labels, real.K), "style": (real.style, 2)}
    x = real.images(real.lat[real.fit_on])
    return {
        n: sg.train_classifier(lambda n=n: Judge(truth[n][1]), x, truth[n][0][real.fit_on],
                               torch.device("cpu"), min_steps=600, seed=seed)
        for n in names if truth[n][0] is not None
    }  # fmt: skip


def judge_translations(run_dir, lat_path, vae_dir, seed=0, judges=None):
    """Pose, class and style of a run's translations of its held-out sources, judged on decoded
    images: {pose_judge, class_judge (, style_judge): the judges' accuracy on held-out real
    images; pose_ref: the share of translations by reference that keep their source's pose, over
    the pairs whose reference is posed the other way; pose_ref_follows_ref: the share that take
    the reference's instead; pose_lat: the same by z, over all pairs; class_ref, class_lat: the
    share judged to be of the target domain; class_ref_moved: class_ref with each reference's
    style moved by the target domain's mean F style less its mean E style (of held-out latents),
    a diagnosis; pix_div_lat, pix_div_real: the mean pixel L1 (images in [0, 1]) between two
    translations of a source by two z, and between two real images of a domain}. With a style
    in the file names: style_ref, the share of translations by reference that take their
    reference's style, over the pairs whose reference and source differ in it; style_same, the
    same over the pairs where they agree (nothing to change: how well the judge reads
    translations, a ceiling for style_ref); style_lat_share and style_real_share, the share of
    style 1 among the translations by z and the held-out real images; style_lat_gap, the
    difference; ref_reach_same (ref_reach_other), the pixel L1 between a source's translations by
    two references of one domain and of one style (of two styles), over the pixel L1 between the
    two references. judges: fit_judges' judges, fitted here where not given."""
    import train_latent_stargan as sg

    cpu = torch.device("cpu")
    ckpt = load_pt(os.path.join(run_dir, "ckpt.pt"))
    cfg, scale = ckpt["config"], ckpt["config"]["latent_scale"]
    (G, E, F_), _ = sg.run_networks(cfg, ckpt, cpu)
    real = judge_data(lat_path, vae_dir, scale, cfg["val_fraction"], seed)
    lat, labels, pose, style, K = real.lat, real.labels, real.pose, real.style, real.K
    held, images, gen = real.held, real.images, real.gen
    judges = judges or fit_judges(lat_path, vae_dir, real=real, seed=seed)
    pose_judge, class_judge, style_judge = (judges.get(n) for n in ("pose", "class", "style"))

    def judged(judge, x):
        with torch.no_grad():
            return torch.cat([judge(c)[1].argmax(1) for c in x.split(500)])

    x_held = images(lat[held])
    out = {
        "pose_judge": float((judged(pose_judge, x_held) == pose[held]).float().mean()),
        "class_judge": float((judged(class_judge, x_held) == labels[held]).float().mean()),
    }
    if style is not None:
        out["style_judge"] = float((judged(style_judge, x_held) == style[held]).float().mean())
    # every held-out source into every other domain: by a held-out reference, and by a z
    src = held.repeat(K - 1)
    y_trg = torch.cat([(labels[held] + k) % K for k in range(1, K)])
    of_domain = [held[labels[held] == d] for d in range(K)]
    ref = torch.stack(
        [of_domain[t][torch.randint(len(of_domain[t]), (), generator=gen)] for t in y_trg.tolist()]
    )
    z = torch.randn(len(src), cfg["latent_dim"], generator=gen)
    with torch.no_grad():
        by_ref = G(lat[src], E(lat[ref], y_trg))
        by_z = G(lat[src], F_(z, y_trg))
    img_ref, img_z = images(by_ref), images(by_z)
    pose_ref, pose_z = judged(pose_judge, img_ref), judged(pose_judge, img_z)
    other = pose[ref] != pose[src]
    out["pose_ref"] = float((pose_ref == pose[src])[other].float().mean())
    out["pose_ref_follows_ref"] = float((pose_ref == pose[ref])[other].float().mean())
    out["pose_lat"] = float((pose_z == pose[src]).float().mean())
    out["class_ref"] = float((judged(class_judge, img_ref) == y_trg).float().mean())
    out["class_lat"] = float((judged(class_judge, img_z) == y_trg).float().mean())
    if style is not None:
        style_ref, style_z = judged(style_judge, img_ref), judged(style_judge, img_z)
        differ = style[ref] != style[src]
        out["style_ref"] = float((style_ref == style[ref])[differ].float().mean())
        out["style_same"] = float((style_ref == style[ref])[~differ].float().mean())
        out["style_lat_share"] = float(style_z.float().mean())
        out["style_real_share"] = float(style[held].float().mean())
        out["style_lat_gap"] = abs(out["style_lat_share"] - out["style_real_share"])
    # how different two z make a source, against two real images of a domain, in pixels
    z2 = torch.randn(len(src), cfg["latent_dim"], generator=gen)
    with torch.no_grad():
        img_z2 = images(G(lat[src], F_(z2, y_trg)))
    out["pix_div_lat"] = float((img_z - img_z2).abs().mean() / 2)  # decoded images in [-1, 1]
    halves = []
    for d in range(K):  # two random halves of each domain's held-out images, paired
        at = torch.nonzero(labels[held] == d).flatten()
        at = at[torch.randperm(len(at), generator=gen)][: len(at) // 2 * 2].view(2, -1)
        halves.append((x_held[at[0]] - x_held[at[1]]).abs().flatten(1).mean(1))
    out["pix_div_real"] = float(torch.cat(halves).mean() / 2)
    if style is not None:  # the reference's reach: a second reference of each pair's domain
        in_held = torch.zeros(len(lat), dtype=torch.long)  # a held-out latent's row of x_held
        in_held[held] = torch.arange(len(held))
        img_refs = x_held[in_held[ref]]
        for name, same in (("ref_reach_same", True), ("ref_reach_other", False)):
            ref2 = []  # of the first one's style (of the other), drawn among the held-out
            for r, t in zip(ref.tolist(), y_trg.tolist()):
                pool = of_domain[t][(style[of_domain[t]] == style[r]) == same]
                pool = pool[pool != r]
                ref2.append(pool[torch.randint(len(pool), (), generator=gen)])
            ref2 = torch.stack(ref2)
            with torch.no_grad():
                img_ref2 = images(G(lat[src], E(lat[ref2], y_trg)))
            apart = (img_refs - x_held[in_held[ref2]]).abs().mean()
            out[name] = float((img_ref - img_ref2).abs().mean() / apart)
    # the reference path in F's region of style space (docs/pose.md)
    y_held, z_mean = labels[held], torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        s_e = E(lat[held], y_held)
        s_f = F_(torch.randn(len(held), cfg["latent_dim"], generator=z_mean), y_held)
        move = torch.stack([(s_f - s_e)[y_held == d].mean(0) for d in range(K)])
        moved = images(G(lat[src], E(lat[ref], y_trg) + move[y_trg]))
    out["class_ref_moved"] = float((judged(class_judge, moved) == y_trg).float().mean())
    return out


# the case the defaults were tuned on: sandal, sneaker, ankle boot, each half mirrored, and by an
# independent coin half dimmed (docs/style.md). Any three classes, any pose of posed() and any
# style of styled() run the same test (docs/pose.md).
POSE_CASE = ((5, 7, 9), "mirror", "dim")
POSE_VAE_STEPS = 200
# the zoomed views of --e_views: a garment at 55% of the frame zoomed to the whole frame (1.82),
# and the whole frame to 55%, and two steps between (docs/style.md)
ZOOM_VIEWS = "0.55,0.74,1.35,1.82"
# the small model of docs/results_fashion.md, 1,280 steps, with the short run's recipe: twice the
# learning rate, and id's weight falling as lambda_ds does (docs/pose.md)
LEARN = (
    "--g_dim 64 --e_dim 32 --d_dim 32 --f_dim 128 --batch_size 16 --epoch_size 1024 --epochs 20 "
    "--ds_decay_epochs 10 --lr 2e-4 --id_decay_epochs 10 --eval_interval 5 --no-decode"
).split()


def posed_latents(folder, classes, pose, style=None, zoom_views=False):
    """The learning test's data, in folder: 2,000 images of each class, posed (and styled); a tiny
    VAE trained on them for 200 steps; their latents (with ZOOM_VIEWS' zoomed encodings where
    zoom_views). Returns (latents file, VAE folder, scale)."""
    images, x = write_posed_fashion(os.path.join(folder, "posed"), classes, pose, style)
    vae_dir, lat = (os.path.join(folder, f) for f in ("vae", "posed.pt"))
    vae, _ = train_vae(x, steps=POSE_VAE_STEPS)
    vae.save_pretrained(vae_dir)
    args = ["--images", images, "--size", 64, "--vae", vae_dir, "--out", lat]
    run("encode_latents.py", *args, *(["--zoom_views", ZOOM_VIEWS] if zoom_views else []))
    return lat, vae_dir, vae.config.scaling_factor


def pose_case(folder, classes, pose, style=None, seed=0, *flags, data=None):
    """The learning test's run, in folder: posed_latents (or data, what it returned; encoded with
    zoomed views where flags have --e_views), then the small model for 1,280 steps (with flags
    after the test's). Returns (the log's evaluation records, judge_translations of the run)."""
    views = "--e_views" in flags
    lat, vae_dir, scale = data or posed_latents(folder, classes, pose, style, views)
    out, evals = train_case(folder, lat, scale, seed, *flags)
    return evals, judge_translations(out, lat, vae_dir)


def train_case(folder, lat, scale, seed=0, *flags):
    """The small model for 1,280 steps on latents lat (flags may ask for more: up to an hour, as
    docs/style.md's 3,840-step runs take), in folder/run: (that folder, the log's evaluation
    records)."""
    out = os.path.join(folder, "run")
    args = ["--data", lat, "--out_dir", out, "--latent_scale", scale, "--seed", seed]
    run("train_latent_stargan.py", *args, *LEARN, *flags, timeout=3600)
    return out, [r for r in load_log(out)["records"] if "acc_ref" in r]


def pose_lane(folder):
    """The pose test's data and run, as the suite runs them in a second process beside its other
    tests: posed_latents of POSE_CASE, written to data.json as soon as the data is there (the ADA
    test trains on it, and the suite fits the pose and class judges meanwhile), then the run,
    the style judge (style_judge.pt), and run.json: the run's folder and evaluation records."""
    import train_latent_stargan as sg

    parent = os.getppid()

    def orphaned():  # the suite killed before it could stop the lane: the lane and its run go too
        while os.getppid() == parent:
            time.sleep(5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=orphaned, daemon=True).start()
    data = posed_latents(folder, *POSE_CASE)
    sg.save_json_atomic(data, os.path.join(folder, "data.json"))  # whole: the suite waits for it
    out, evals = train_case(folder, data[0], data[2])
    judge = fit_judges(*data[:2], ["style"]).get("style")
    path = os.path.join(folder, "style_judge.pt") if judge else None
    if judge:
        torch.save(judge.state_dict(), path)
    sg.save_json_atomic(
        {"run": out, "evals": evals, "style_judge": path}, os.path.join(folder, "run.json")
    )
    return folder


def style_arg(style):
    return None if style in (None, "none") else style


def posed_fashion(folder, classes="5,7,9", pose="mirror", style=None):
    """The posed PNG folders of the docs' figures: write_posed_fashion's image folders."""
    classes = [int(c) for c in classes.split(",")]
    return write_posed_fashion(folder, classes, pose, style_arg(style))[0]


def case(folder, classes="5,7,9", pose="mirror", style="dim", seed=0, *flags):
    """pose_case as a command: the run's last evaluation and its judged figures, as JSON."""
    classes = [int(c) for c in classes.split(",")]
    evals, judged = pose_case(folder, classes, pose, style_arg(style), int(seed), *flags)
    keep = ("epoch", "acc_ref", "acc_lat", "fd_mean", "div", "content_ref", "content_lat")
    last = {k: round(evals[-1][k], 4) for k in keep if k in evals[-1]}
    return json.dumps(
        {"last evaluation": last, "judged": {k: round(v, 4) for k, v in judged.items()}}
    )


COMMANDS = {
    "images": posed_fashion,  # FOLDER [CLASSES [POSE [STYLE]]]
    "vae": lambda folder, minutes=8: train_fashion_vae(folder, float(minutes)),
    "tiny-vae": save_tiny_vae,  # FOLDER
    "case": case,  # FOLDER [CLASSES [POSE [STYLE [SEED [FLAGS...]]]]]
    "vae-moves": vae_moves,  # VAE_FOLDER
    "pose-lane": pose_lane,  # FOLDER
}

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__.split("\n\n")[2])
    print(COMMANDS[sys.argv[1]](*sys.argv[2:]))
