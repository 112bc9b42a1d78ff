"""
Image folders (one sub-folder per domain) to unscaled SD-VAE latents in one .pt, for the trainer.

    python encode_latents.py --images data/afhq/train --out data/afhq.pt         # cat, dog, wild
    python encode_latents.py --images data/afhq/train --domains cat,dog --out data/catdog.pt
    python encode_latents.py --source idx --images /usr/share/datasets/fashion-mnist \\
        --classes 5,7,9 --size 64 --out data/shoes.pt   # Fashion-MNIST sandal/sneaker/boot, offline
    python encode_latents.py ... --resume          # continue an interrupted encode where it stopped
    python encode_latents.py ... --decode_check 8  # decode 8 latents back: a PNG and the PSNR
    python encode_latents.py ... --vae ./sd-vae-ft-mse   # a local copy of the VAE (offline)
    python encode_latents.py ... --zoom_views 0.55,0.74,1.35,1.82   # also each image zoomed
    torchrun --standalone --nproc_per_node 8 encode_latents.py ...  # 8 GPUs, the same file

Each image: RGB (grayscale repeated), shorter side resized to --size (bicubic, antialiased),
center crop, scaled to [-1, 1], encoded by diffusers' AutoencoderKL. The latent is
latent_dist.mean (deterministic), or a draw with --mode sample. It is stored UNSCALED, in float16:
the trainer multiplies by the scaling factor.

Output (read by train_latent_stargan.py):
    {"latents": float16 (N, 4, size/8, size/8), "labels": int64 (N,), "domains": [...],
     "paths": [...], "vae": ..., "subfolder": ..., "scaling_factor": 0.18215, "image_size": size,
     "mode": "mean" | "sample"}
    and, with --zoom_views, "views": float16 (N, Z, 4, size/8, size/8), each image zoomed about its
    centre by each of the Z factors before it is encoded, and "view_zooms": the factors. The
    trainer's E can take its views from them (--e_views): a zoom of the image, where a zoom of the
    latent is not what the VAE makes of a smaller or larger garment (docs/style.md).
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
import warnings

import numpy as np
import torch

SCRIPT = "encode_latents.py"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # the SD 1.x latent space
# what an interrupted encode must share with its --resume
RESUME_KEYS = (
    "images",
    "source",
    "domains",
    "classes",
    "max_per_domain",
    "size",
    "vae",
    "subfolder",
    "mode",
    "seed",
    "batch_size",
    "shard_size",
    "dtype",
    "zoom_views",
)

# -----------------------------------------------------------------------------
# flags


def build_parser():
    p = ArgParser(
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # fmt: off
    # input
    p.add_argument("--images", required=True,
                   help="folder with one sub-folder per domain (or, with --source idx, IDX files)")
    p.add_argument("--source", choices=("folder", "idx"), default="folder",
                   help="image folders (default) or an MNIST-format IDX set")
    p.add_argument("--domains", default=None,
                   help="comma-separated sub-folders to use, in this order (default: all, sorted)")
    p.add_argument("--classes", default=None,
                   help="--source idx: comma-separated labels, each becomes a domain (e.g. 5,7,9)")
    p.add_argument("--max_per_domain", type=nonneg_int, default=0,
                   help="at most this many images per domain (default 0: all)")
    p.add_argument("--size", type=multiple_of_8, default=256,
                   help="square image size in pixels, a multiple of 8 (default 256: 32x32 latents)")
    # VAE
    p.add_argument("--vae", default=DEFAULT_VAE,
                   help=f"Hub id or local folder of a diffusers AutoencoderKL ({DEFAULT_VAE})")
    p.add_argument("--subfolder", default=None,
                   help="subfolder of --vae that holds the VAE (vae, for a whole SD pipeline repo)")
    p.add_argument("--mode", choices=("mean", "sample"), default="mean",
                   help="latent_dist.mean (default, deterministic) or a draw")
    p.add_argument("--seed", type=int, default=0, help="seed of --mode sample's draws")
    p.add_argument("--zoom_views", default="",
                   help="comma-separated zoom factors, e.g. 0.55,0.74,1.35,1.82: each image is "
                        "also encoded zoomed by each about its centre (above 1 a centre crop, "
                        "below 1 framed in its border's mean colour), for E's views")
    # output
    p.add_argument("--out", default="data/latents.pt",
                   help="output .pt (default data/latents.pt); progress goes to <out>.parts/")
    p.add_argument("--resume", action="store_true", help="continue an encode from <out>.parts/")
    p.add_argument("--decode_check", type=nonneg_int, default=0, metavar="N",
                   help="decode N stored latents: originals above reconstructions in "
                        "<out>_check.png, and the PSNR")
    p.add_argument("--max_bad", type=unit_float, default=0.01,
                   help="stop when more than this share of the images cannot be read")
    # system
    p.add_argument("--batch_size", type=positive_int, default=32, help="images per VAE call")
    p.add_argument("--shard_size", type=positive_int, default=4096,
                   help="latents per progress shard, rounded up to whole batches")
    p.add_argument("--workers", type=nonneg_int, default=None,
                   help="image-decoding processes (default: 0 on CPU, up to 8 on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, cuda:1, cpu, ...")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="VAE precision (default float16 on CUDA, float32 on CPU)")
    # fmt: on
    return p


def parse_config(argv=None):
    cfg = vars(build_parser().parse_args(argv))
    if cfg["source"] == "idx":
        if not cfg["classes"]:
            die("--source idx needs --classes, e.g. --classes 5,7,9")
        try:
            cfg["classes"] = [int(c) for c in cfg["classes"].split(",")]
        except ValueError:
            die(f"--classes takes comma-separated integer labels, got {cfg['classes']}")
    elif cfg["classes"]:
        die("--classes applies to --source idx; for folders, pick sub-folders with --domains")
    cfg["domains"] = cfg["domains"].split(",") if cfg["domains"] else None
    try:
        cfg["zoom_views"] = [float(f) for f in cfg["zoom_views"].split(",") if f.strip()]
    except ValueError:
        die(f"--zoom_views takes comma-separated factors, e.g. 0.55,1.82; got {cfg['zoom_views']}")
    if any(not 0.1 <= f <= 10 for f in cfg["zoom_views"]):
        die(f"--zoom_views: each factor must lie in [0.1, 10]; got {cfg['zoom_views']}")
    try:
        dev = torch.device(cfg["device"])
    except RuntimeError as e:
        die(f"--device {cfg['device']}: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        die(f"--device {cfg['device']}: CUDA is not available here; use --device cpu")
    cfg["dtype"] = cfg["dtype"] or ("float16" if dev.type == "cuda" else "float32")
    if cfg["workers"] is None:
        cfg["workers"] = min(8, (os.cpu_count() or 2) - 1) if dev.type == "cuda" else 0
    cfg["shard_size"] = math.ceil(cfg["shard_size"] / cfg["batch_size"]) * cfg["batch_size"]
    return cfg


# -----------------------------------------------------------------------------
# argparse with one-line errors, and the types that check a flag's range


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


def nonneg_int(text):
    return check(text, int, lambda v: v >= 0, "zero or positive")


def unit_float(text):
    return check(text, float, lambda v: 0 <= v < 1, "in [0, 1)")


def multiple_of_8(text):
    return check(
        text,
        int,
        lambda v: v >= 8 and v % 8 == 0,
        "a positive multiple of 8 (the VAE downsamples 8x)",
    )


# -----------------------------------------------------------------------------
# what to encode: (source path, label) items, in a fixed order


def list_folder(images, domains=None):
    """Items (path relative to images, label) from images/<domain>/**, domains sorted or given."""
    if not os.path.isdir(images):
        raise ValueError(f"--images {images}: no such folder")
    found = sorted(
        d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d)) and d[0] != "."
    )
    if domains:
        missing = [d for d in domains if d not in found]
        if missing:
            raise ValueError(
                f"--domains: no folder {', '.join(missing)} in {images} (found: "
                f"{', '.join(found) or 'none'})"
            )
        found = domains
    if len(found) < 2:
        raise ValueError(
            f"{images} has {len(found)} domain folder(s) ({', '.join(found) or 'none'})"
            "; the StarGAN translates between domains, so it needs at least 2: one "
            "sub-folder per domain"
        )
    items = []
    for label, d in enumerate(found):
        files = image_files(os.path.join(images, d), images)
        if not files:
            raise ValueError(
                f"domain '{d}' ({os.path.join(images, d)}) has no images ({' '.join(IMAGE_EXTS)})"
            )
        items += [(f, label) for f in files]
    return items, found


def image_files(folder, relative_to):
    """The image files under folder, sub-folders included, sorted, as paths relative_to."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for n in sorted(names):
            if n.lower().endswith(IMAGE_EXTS) and not n.startswith("."):
                files.append(os.path.relpath(os.path.join(root, n), relative_to))
    return files


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


def list_idx(images, classes, max_per_domain=0):
    """Items ('<images file>#<index>', label) of the chosen classes of an IDX training set, the
    domain names, and the images array."""
    if not os.path.isdir(images):
        raise ValueError(f"--images {images}: no such folder")
    names = []
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        found = [n for n in (stem + ".gz", stem) if os.path.exists(os.path.join(images, n))]
        if not found:
            raise ValueError(f"--source idx: no {stem}(.gz) in {images}")
        names.append(found[0])
    imgs, labels = (read_idx(os.path.join(images, n)) for n in names)
    if imgs.ndim != 3 or labels.ndim != 1 or len(imgs) != len(labels):
        raise ValueError(
            f"{images}: {names[0]} and {names[1]} do not form an image set with one label per image"
        )
    present = sorted(set(labels.tolist()))
    missing = [c for c in classes if c not in present]
    if missing:
        raise ValueError(
            f"--classes {','.join(map(str, missing))}: not among the labels in "
            f"{images} ({','.join(map(str, present))})"
        )
    if len(classes) < 2:
        raise ValueError("--classes needs at least 2 classes: each becomes a domain")
    items = []
    for label, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[:max_per_domain] if max_per_domain else idx
        items += [(f"{names[0]}#{i}", label) for i in idx.tolist()]
    return items, [str(c) for c in classes], imgs


# -----------------------------------------------------------------------------
# preprocessing: PIL, in DataLoader workers; uint8 leaves the worker, the device makes the floats


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


def zoom(x, factor):
    """Images (B, C, S, S) in [-1, 1] zoomed by factor about their centre: resized (bicubic,
    antialiased), then above 1 centre-cropped, below 1 framed in the mean colour of each image's
    border (black where the background is black)."""
    S, dtype = x.shape[-1], x.dtype
    side = max(1, round(S * factor))
    x = x.float()
    y = torch.nn.functional.interpolate(x, size=(side, side), mode="bicubic", antialias=True)
    y = y.clamp(-1, 1)
    if side >= S:
        o = (side - S) // 2
        return y[..., o : o + S, o : o + S].to(dtype)
    edge = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], -1).mean(-1)
    out = edge[..., None, None].expand_as(x).clone()
    o = (S - side) // 2
    out[..., o : o + side, o : o + side] = y
    return out.to(dtype)


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


def first_line(e, n=150):
    return (str(e).strip().splitlines() or [""])[0][:n]


# -----------------------------------------------------------------------------
# files: atomic writes; the progress shards of an encode, and the file they make


def save_torch_atomic(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_json_atomic(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
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


def open_parts(cfg, parts, manifest, n_shards):
    """The shards an interrupted encode finished in the parts folder (with --resume), or none. One
    line and exit 2 for an interrupted encode without --resume, or one with other flags."""
    manifest_path = os.path.join(parts, "manifest.json")
    if os.path.isdir(parts) and not cfg["resume"]:
        die(
            f"an interrupted encode is in {parts}: continue it with --resume, or delete that "
            "folder to start over"
        )
    if not cfg["resume"]:
        return set()
    if not os.path.isdir(parts):
        print_once(f"--resume: no interrupted encode at {parts}; starting from the beginning")
        return set()
    try:
        with open(manifest_path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        die(f"--resume: {manifest_path} is missing or unreadable; delete {parts} to start over")
    diff = [k for k in manifest if old.get(k) != manifest[k]]
    if diff:
        what = ", ".join(
            "the image list" if k in ("items", "n") else f"--{k} {old.get(k)}" for k in diff
        )
        die(
            f"--resume: the interrupted encode in {parts} had {what}; resume with the same flags "
            f"and images, or delete {parts} to start over"
        )
    done = {k for k in range(n_shards) if os.path.exists(shard_path(parts, k))}
    print_once(f"resuming: {len(done)} of {n_shards} shards done")
    return done


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


def duration(seconds):
    """A time span in the units a person reads: 1h02m, 3m05s, 12s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def print_once(msg):
    """print, on rank 0 alone under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(msg)


def shard_path(parts, k):
    return os.path.join(parts, f"shard_{k:05d}.pt")


def assemble(parts, n_shards):
    """(latents, index of each latent in the items, the unreadable (path, error)s, the zoomed
    views (N, Z, C, h, w)) from the finished shards, in order."""
    index, latents, views, bad = [], [], [], []
    for k in range(n_shards):
        s = torch.load(shard_path(parts, k), weights_only=True)
        bad += [tuple(b) for b in s["bad"]]
        if len(s["index"]):
            index.append(s["index"]), latents.append(s["latents"]), views.append(s["views"])
    return torch.cat(latents), torch.cat(index), bad, torch.cat(views)


def encode_batch(vae, x, mode, gen):
    """vae's latents of images x in [-1, 1]: latent_dist.mean, or a draw from gen."""
    dist = vae.encode(x).latent_dist
    return dist.mean if mode == "mean" else dist.sample(generator=gen)


def decode_check(vae, result, index, items, cfg, idx_images, device, dtype):
    """Decode a few stored latents, spread over the domains: originals above reconstructions in
    <out>_check.png, and the PSNR between them."""
    m = min(cfg["decode_check"], len(index))
    pick = torch.linspace(0, len(index) - 1, m).round().long().tolist()
    ds = Items(items, cfg["images"], cfg["size"], idx_images)
    orig = torch.stack([ds[index[j].item()][0] for j in pick]).float() / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(result["latents"][pick].to(device, dtype)).sample.float()
    rec = rec.clamp(-1, 1).cpu()
    mse = ((orig - rec) / 2).pow(2).flatten(1).mean(1)  # on the [0, 1] scale
    psnr = (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()
    check = os.path.splitext(cfg["out"])[0] + "_check.png"
    save_grid(torch.cat([orig, rec]), check, nrow=m)
    print(
        f"decode check: {m} latents decoded, PSNR {psnr:.2f} dB (originals above "
        f"reconstructions in {check})"
    )


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(argv)
    # under torchrun each rank encodes every world-th shard; rank 0 assembles the file. gloo even
    # on GPUs: the ranks only meet at barriers
    rank, world, device = init_distributed(torch.device(cfg["device"]), backend="gloo")
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    dtype = dtype[cfg["dtype"]]
    out, parts = cfg["out"], cfg["out"] + ".parts"

    # what to encode
    idx_images = None
    try:
        if cfg["source"] == "idx":
            items, domains, idx_images = list_idx(
                cfg["images"], cfg["classes"], cfg["max_per_domain"]
            )
        else:
            items, domains = list_folder(cfg["images"], cfg["domains"])
    except ValueError as e:
        die(str(e))
    if cfg["source"] == "folder" and cfg["max_per_domain"]:
        per = [
            [it for it in items if it[1] == d][: cfg["max_per_domain"]] for d in range(len(domains))
        ]
        items = [it for group in per for it in group]
    n, S, B = len(items), cfg["shard_size"], cfg["batch_size"]
    n_shards = math.ceil(n / S)

    # progress: shards of whole batches in <out>.parts, described by a manifest; --resume skips
    # the finished ones
    digest = hashlib.sha1(json.dumps(items).encode()).hexdigest()
    manifest = {"script": SCRIPT, **{k: cfg[k] for k in RESUME_KEYS}, "items": digest, "n": n}
    done = open_parts(cfg, parts, manifest, n_shards)
    try:  # before any progress folder exists: a VAE that does not load leaves nothing behind
        vae = load_vae(cfg["vae"], cfg["subfolder"], device, dtype)
    except ValueError as e:
        die(str(e))
    if world > 1:  # every rank has looked for an interrupted encode before rank 0 makes one
        torch.distributed.barrier()
    if rank == 0:
        os.makedirs(parts, exist_ok=True)
        save_json_atomic(manifest, os.path.join(parts, "manifest.json"))
    if world > 1:
        torch.distributed.barrier()
    memory_format = torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        memory_format = torch.channels_last
        vae = vae.to(memory_format=memory_format)
    scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))

    # the encode loop: one DataLoader over the shards still to do, in order, so the batches are a
    # full run's
    todo = [k for k in range(n_shards) if k not in done][rank::world]  # this rank's shards
    order = [i for k in todo for i in range(k * S, min((k + 1) * S, n))]
    dataset = torch.utils.data.Subset(Items(items, cfg["images"], cfg["size"], idx_images), order)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=B, num_workers=cfg["workers"], pin_memory=device.type == "cuda"
    )
    bad = [
        tuple(b)
        for k in sorted(done)
        for b in torch.load(shard_path(parts, k), weights_only=True)["bad"]
    ]
    t0 = t_print = time.perf_counter()
    n_done, shard, is_tty = 0, None, sys.stdout.isatty()
    for x, idx, errs in loader:
        k = idx[0].item() // S
        if shard is None:
            shard = {"shard": k, "index": [], "latents": [], "views": [], "bad": []}
        ok = torch.tensor([not e for e in errs])
        for i, e in zip(idx.tolist(), errs):
            if e:
                print(f"warning: skipping {items[i][0]}: {e}", file=sys.stderr)
                shard["bad"].append((items[i][0], e))
                bad.append((items[i][0], e))
        if len(bad) > cfg["max_bad"] * n:  # this rank's alone are too many already
            die(
                f"{'' if world == 1 else f'rank {rank}: '}"
                f"{len(bad)} of {n} images could not be read, more than --max_bad "
                f"{cfg['max_bad']:g} of them (first: {bad[0][0]}: {bad[0][1]}); fix or remove "
                "them, or raise --max_bad. Done so far is kept: --resume",
                every_rank=True,
            )
        if ok.any():
            x = x[ok].to(device, non_blocking=True)
            x = (x.to(dtype) / 127.5 - 1).contiguous(memory_format=memory_format)
            # one generator per batch, seeded by its first item: resume draws the same
            gen = torch.Generator(device).manual_seed(cfg["seed"] * 1_000_003 + idx[0].item())
            with torch.no_grad():
                zs = [encode_batch(vae, x, cfg["mode"], gen)]
                zs += [encode_batch(vae, zoom(x, f), cfg["mode"], gen) for f in cfg["zoom_views"]]
            z = torch.stack(zs, 1).float()  # (B, 1 + Z, C, h, w): the image, then its zooms
            if not torch.isfinite(z).all():
                die(
                    f"non-finite latents for the batch starting at {items[idx[0].item()][0]} in "
                    f"{cfg['dtype']}; try --dtype float32 (or bfloat16)",
                    every_rank=True,
                )
            shard["latents"].append(z[:, 0].to(torch.float16).cpu())
            shard["views"].append(z[:, 1:].to(torch.float16).cpu())
            shard["index"] += idx[ok].tolist()
        n_done += len(idx)
        if idx[-1].item() == min((k + 1) * S, n) - 1:  # a finished shard is written atomically
            latents, views = (
                torch.cat(shard[key]) if shard[key] else torch.zeros(0)
                for key in ("latents", "views")
            )
            index = torch.tensor(shard["index"], dtype=torch.int64)
            save_torch_atomic(
                {"index": index, "latents": latents, "views": views, "bad": shard["bad"]},
                shard_path(parts, k),
            )
            shard = None
        now = time.perf_counter()
        if (now - t_print > 2 or n_done == len(order)) and rank == 0:
            rate = n_done / (now - t0)
            total = n_done + sum(min(S, n - k * S) for k in done)
            left = f"eta {duration((len(order) - n_done) / rate)}"
            msg = f"encoded {total}/{n} ({100 * total / n:.0f}%) | {rate:.1f} img/s | {left}"
            if world > 1:  # rank 0's share, in its own time: the others go at its pace
                msg = f"rank 0 of {world}: encoded {n_done}/{len(order)} | {rate * world:.1f} img/s"
                msg += f" (all ranks) | {left}"
            last = not is_tty or n_done == len(order)
            print(("\r" + msg) if is_tty else msg, end="\n" if last else "", flush=True)
            t_print = now
    rate = n_done * world / max(time.perf_counter() - t0, 1e-9)
    if world > 1:  # every shard is written; rank 0 assembles them
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return

    # assemble the final file from the shards, atomically, then drop the progress folder
    latents, index, bad, views = assemble(parts, n_shards)
    if len(bad) > cfg["max_bad"] * n:  # the ranks' together
        die(
            f"{len(bad)} of {n} images could not be read, more than --max_bad {cfg['max_bad']:g} "
            f"of them (first: {bad[0][0]}: {bad[0][1]}); fix or remove them, or raise --max_bad. "
            "Done so far is kept: --resume"
        )
    labels = torch.tensor([items[i][1] for i in index.tolist()], dtype=torch.int64)
    result = {
        "latents": latents,
        "labels": labels,
        "domains": domains,
        "paths": [items[i][0] for i in index.tolist()],
        "vae": cfg["vae"],
        "subfolder": cfg["subfolder"],
        "scaling_factor": scaling_factor,
        "image_size": cfg["size"],
        "mode": cfg["mode"],
    }
    if cfg["zoom_views"]:
        result.update(views=views, view_zooms=cfg["zoom_views"])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_torch_atomic(result, out)
    shutil.rmtree(parts)
    counts = torch.bincount(result["labels"], minlength=len(domains)).tolist()
    per_domain = ", ".join(f"{d} {c}" for d, c in zip(domains, counts))
    print(
        f"wrote {out}: {len(index)} latents {'x'.join(map(str, latents.shape[1:]))} float16 "
        f"(unscaled; scaling_factor {scaling_factor}) from {n} images, {len(bad)} skipped as "
        f"unreadable; domains {per_domain}; {rate:.1f} img/s"
    )
    if cfg["decode_check"]:
        decode_check(vae, result, index, items, cfg, idx_images, device, dtype)


if __name__ == "__main__":
    main()
