"""
Every curve of a training run in one picture, and what the curves mean in plain words.

    python plot_losses.py out/latent_stargan/log.json                  # -> beside it: losses.png
    python plot_losses.py out/a/log.json out/b/log.json --labels bce,wgan-gp   # runs overlaid
    python plot_losses.py log.json --smooth 5 --x step --out curves.svg      # PNG, SVG or PDF
    python plot_losses.py log.json --diagnose --annotate                     # findings, footer

Reads a trainer's log.json ({"script", "config", "records"}), a bare JSON list of records, or JSON
Lines (one record a line; a truncated last line is skipped with a warning), also while training
still writes it. What to draw and diagnose comes from what the log holds (its config and keys),
whichever script, fork or rename wrote it. A record with a missing key leaves a gap in that curve.

How to read the curves (seeds 000, 001, 003):
- d_loss under hinge (the latent StarGAN) is 2 when D's logits are near 0: pinned there, D learns
  nothing. Under seed 004's averaged BCE, balance is ln 2 = 0.693 (D = 1/2), and g_loss's too.
- d_loss falling toward 0 while g_loss or g_adv climbs: D dominates and G's gradient fades.
- ds is a distance that G is pushed to increase: it enters g_loss with a minus sign, times
  lambda_ds, which decays linearly to 0 at epoch ds_decay_epochs + 1. After that ds is watched.
- r1 looks tiny because it is 0 on every step but one in r1_interval, and averaged with those
  zeros; its weight in d_loss is w_r1 * r1_interval, so it adds w_r1 * r1_interval * mean r1.
- Losses cannot show mode collapse; modes, fd and div (the trainers' evaluation) can.
- ada_rt (the latent StarGAN) is E[sign(D(x_ref))], StyleGAN2-ADA's r_t: near 1, D calls
  nearly every real latent real, the sign that it has memorised them; ada_p is the augmentation
  probability that ADA (--ada_target) moves to hold r_t at its target.
- content_ref and content_lat (the latent StarGAN's evaluation) near 0: G ignores its source and
  draws each translation from the style alone; near 1: translations differ as their sources do.
- style_lat and style_ref: how far two z, or two references, move a translation's style against
  how far apart two real latents of the domain are. 1: as real data; near 0: one look.
"""

import argparse
import json
import math
import os
import sys

import numpy as np

SCRIPT = "plot_losses.py"
ORDER = ["d_loss", "g_loss", "g_adv", "sty", "ds", "cyc", "id", "r1", "lambda_ds"]  # seed 001's
NOT_CURVES = {"epoch", "step", "time", "partial"}
PRDC = ("precision", "recall", "density", "coverage")
REFERENCE = {"clf_acc", "fd_real", "kid_real", "is_real", "div_real"} | {f"{m}_real" for m in PRDC}
# a curve's real-data level, logged once and drawn as a line
REAL_LEVEL = {
    "fd": "fd_real",
    "fd_mean": "fd_real",
    "kid": "kid_real",
    "is": "is_real",
    "div": "div_real",
    "style_cov": "style_cov_real",
    **{m: f"{m}_real" for m in PRDC},
}
PER_DOMAIN = {"fd": "fd_mean", **{m: m for m in PRDC}}  # fd_<domain> goes in the fd_mean panel
LN2 = math.log(2)

# -----------------------------------------------------------------------------
# flags


def build_parser():
    p = ArgParser(
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # fmt: off
    p.add_argument("logs", nargs="+", help="log.json files (or JSON lists of records, JSON Lines)")
    p.add_argument("--out", default=None,
                   help="the picture: .png (default: losses.png beside the first log), .svg, .pdf")
    p.add_argument("--labels", default=None, help="comma-separated run names (default: folders)")
    p.add_argument("--x", choices=("epoch", "step"), default="epoch", help="the shared x axis")
    p.add_argument("--smooth", type=positive_int, default=1, metavar="K",
                   help="moving average over K records; the raw curve stays faint behind")
    p.add_argument("--diagnose", action="store_true", help="print the findings")
    p.add_argument("--annotate", action="store_true", help="write the findings in the footer")
    p.add_argument("--no_plot", action="store_true", help="only diagnose, draw nothing")
    # thresholds of the diagnosis
    p.add_argument("--d_low", type=float, default=0.25,
                   help="D dominates when d_loss ends below this share of its balance level")
    p.add_argument("--pinned_tol", type=float, default=0.05,
                   help="hinge d_loss within this of 2 (or D(x), D(G(z)) of 1/2) is pinned")
    p.add_argument("--stuck_epochs", type=int, default=5,
                   help="pinned for this many epochs in a row: D stopped learning")
    p.add_argument("--diverge", type=float, default=50.0,
                   help="a value this many times its typical size is divergence")
    p.add_argument("--ds_drop", type=float, default=0.25,
                   help="ds below this share of its peak while lambda_ds > 0: collapsing")
    p.add_argument("--osc_min_records", type=int, default=8,
                   help="records needed to look for oscillation")
    p.add_argument("--osc_corr", type=float, default=0.3,
                   help="autocorrelation at the period needed to call it oscillation")
    p.add_argument("--osc_rel", type=float, default=0.1,
                   help="amplitude, as a share of the curve's mean size, to report")
    p.add_argument("--min_modes", type=int, default=8,
                   help="fewer covered classes than this at the last evaluation: mode collapse")
    p.add_argument("--div_drop", type=float, default=0.25,
                   help="div below this share of its peak: diversity collapse")
    p.add_argument("--low_coverage", type=float, default=0.5,
                   help="coverage below this share of real data's at the last evaluation: collapse")
    p.add_argument("--rt_high", type=float, default=0.6,
                   help="ada_rt above this for --overfit_epochs records at the end: D overfits")
    p.add_argument("--overfit_epochs", type=int, default=3,
                   help="records in a row that --rt_high counts")
    p.add_argument("--leak_p", type=float, default=0.8,
                   help="ada_p above this: the augmentation may leak into the outputs")
    p.add_argument("--min_content", type=float, default=0.2,
                   help="content_ref or content_lat below this at the last evaluation: G ignores "
                        "its source")
    p.add_argument("--min_style", type=float, default=0.25,
                   help="style_lat or style_ref below this at the last evaluation: one look")
    # fmt: on
    return p


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


# -----------------------------------------------------------------------------
# reading logs


class LogError(Exception):
    pass


def read_log(path):
    """(meta, records) from a log.json, a bare list of records, or JSON Lines. meta holds the
    script and config (empty for a bare list or JSON Lines)."""
    if not os.path.exists(path):
        raise LogError(f"{path}: no such file")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise LogError(
            f"{path}: the file is empty (a run writes its first record at the end of "
            "its first epoch)"
        )
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj, meta, records = None, {}, read_json_lines(path, text)
    if obj is not None:
        if isinstance(obj, dict) and isinstance(obj.get("records"), list):
            meta, records = (
                {"script": obj.get("script"), "config": obj.get("config") or {}},
                obj["records"],
            )
        elif isinstance(obj, list):
            meta, records = {}, obj
        elif isinstance(obj, dict) and any(is_number(v) for v in obj.values()):
            meta, records = {}, [obj]  # JSON Lines with a single record
        else:
            raise LogError(
                f'{path}: JSON, but no training log: expected {{"records": [...]}}, a '
                "list of records, or one record per line"
            )
    records = [r for r in records if isinstance(r, dict)]
    if not any(is_number(v) for r in records for k, v in r.items() if k not in NOT_CURVES):
        raise LogError(f"{path}: no record has a numeric value to plot")
    meta.setdefault("config", {})
    return meta, records


def read_json_lines(path, text):
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and i > 0:  # a line still being written
                print(f"warning: {path}: skipping the truncated last line {i + 1}", file=sys.stderr)
                continue
            raise LogError(
                f"{path}: neither JSON nor JSON Lines (line {i + 1} does not parse)"
            ) from None
    return records


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def column(records, key):
    """Values of key in every record, NaN where missing or not a number (a gap in the curve)."""
    return np.array([float(r[key]) if is_number(r.get(key)) else np.nan for r in records])


def xs_of(records, x):
    col = column(records, x)
    return col if np.isfinite(col).all() else np.arange(1, len(records) + 1, dtype=np.float64)


def curve_keys(runs):
    """Keys to draw, in seed 001's order, then the rest in first-seen order, imgs_per_sec last."""
    seen = []
    for _, records in runs:
        for r in records:
            for k, v in r.items():
                if k not in NOT_CURVES and k not in seen and (is_number(v) or v is None):
                    seen.append(k)
    rest = [k for k in seen if k not in ORDER and k != "imgs_per_sec"]
    return [k for k in ORDER if k in seen] + rest + ["imgs_per_sec"] * ("imgs_per_sec" in seen)


def domain_panel(key, keys):
    """The panel a per-domain figure of the latent StarGAN (fd_<domain>, coverage_<domain>, ...)
    is drawn in, with its mean; None for any other key."""
    for prefix, panel in PER_DOMAIN.items():
        if key.startswith(prefix + "_") and key != panel and key not in REFERENCE and panel in keys:
            return panel
    return None


# -----------------------------------------------------------------------------
# what a log says about its run: from its config and its keys, never from the script's name


def is_translation(meta, records):
    """A latent StarGAN's log: its config has the seed 001 loss weights, or its records g_adv."""
    return "w_adv" in meta["config"] or any("g_adv" in r for r in records)


def loss_kind(meta, records):
    """'hinge', 'bce', 'minimax', 'lsgan', 'wgan' or None: which reference levels apply."""
    cfg = meta["config"]
    if is_translation(meta, records):
        return cfg.get("adv_loss", "hinge")
    loss = cfg.get("loss")
    return "wgan" if loss in ("wgan", "wgan-gp") else loss


def penalty_weight(meta, key):
    """What multiplies the logged (mean) r1 or r2 in d_loss, and how to say it."""
    cfg = meta["config"]
    w = {"r1": "w_r1", "r2": "w_r2"}[key]
    if w in cfg:
        k = cfg.get("r1_interval", 1)
        return cfg[w] * k, f"{w} * r1_interval = {cfg[w]:g} * {k}"
    if cfg.get(key):
        end = " at the start" if cfg.get("gamma_end") is not None else ""
        return cfg[key] / 2, f"GAMMA/2 = {cfg[key] / 2:g}{end}"
    return None, None


def reference_lines(meta, key, records):
    """[(y, label)] horizontal reference lines for one panel."""
    kind, lines = loss_kind(meta, records), []
    if key == "d_loss" and kind == "hinge":
        lines.append((2.0, "hinge: logits near 0"))
    if key == "d_loss" and kind in ("bce", "minimax"):
        lines.append((LN2, "D = 1/2: ln 2"))
    if key == "d_loss" and kind == "lsgan":
        lines.append((0.25, "D = 1/2"))
    if key == "d_loss" and kind == "nsgan":
        lines.append((2 * LN2, "logits 0: 2 ln 2"))
    if key in ("d_loss", "g_loss") and kind == "rpgan":
        lines.append((LN2, "D(fake) = D(real): ln 2"))
    if key == "g_loss" and kind == "bce":
        lines.append((LN2, "D(G(z)) = 1/2: ln 2"))
    if key == "g_loss" and kind == "minimax":
        lines.append((-LN2, "D(G(z)) = 1/2: -ln 2"))
    if key in ("d_real", "d_fake") and kind in ("bce", "minimax", "lsgan"):
        lines.append((0.5, "1/2"))
    if key == "ada_rt" and meta["config"].get("ada_target") is not None:
        lines.append((meta["config"]["ada_target"], "ada_target"))
    if key == "ada_p":
        lines.append((0.8, "about 0.8: may leak"))
    if key in ("content_ref", "content_lat"):
        lines += [(1.0, "1: G = identity"), (0.0, "0: the source is ignored")]
    if key in ("style_lat", "style_ref"):
        lines += [(1.0, "1: as real data"), (0.0, "0: one look")]
    if key in REAL_LEVEL:
        vals = finite(column(records, REAL_LEVEL[key]))
        if len(vals):
            lines.append((float(vals[0]), "real data"))
    return lines


def lambda_zero_x(meta, records, x):
    """Where lambda_ds reaches 0 (epoch ds_decay_epochs + 1), on the x axis; None if it does not
    apply."""
    cfg = meta["config"]
    if not cfg.get("ds_decay_epochs") or not cfg.get("w_ds"):
        return None
    epoch = cfg["ds_decay_epochs"] + 1
    if x == "epoch":
        return float(epoch)
    steps = finite(column(records, "step") / column(records, "epoch"))  # steps per epoch
    return float(epoch * np.median(steps)) if len(steps) else None


# -----------------------------------------------------------------------------
# the diagnosis: one small function per finding, each taking (meta, records, thresholds) and
# returning its findings as plain sentences with the numbers that triggered them. Add one to
# FINDINGS (at the end of this section) and --diagnose reports it.


def window(n, frac=1 / 3, least=3):
    return max(least, int(math.ceil(n * frac)))


def finite(v):
    return v[np.isfinite(v)]


def divergence(meta, records, th):
    """A value that is NaN/inf, or that grows past --diverge times its typical size."""
    out, ep = [], xs_of(records, "epoch")
    for key in curve_keys([(meta, records)]):
        col = column(records, key)
        bad = np.array([key in r for r in records]) & ~np.isfinite(col)
        if bad.any():
            i = int(np.argmax(bad))
            out.append(f"{key} is {records[i][key]} at epoch {ep[i]:g}: the run diverged there")
            continue
        vals = finite(col)
        if len(vals) < 4 or key == "imgs_per_sec":
            continue
        typical = np.median(np.abs(vals[: max(2, len(vals) // 2)]))
        big = np.abs(col) > max(th.diverge * typical, 10.0)
        if big.any():
            i = int(np.argmax(big))
            times = abs(col[i]) / max(typical, 1e-12)
            out.append(
                f"{key} reaches {col[i]:.4g} at epoch {ep[i]:g}, {times:.0f}x its typical "
                f"size {typical:.3g}: diverging"
            )
    return out


def d_dominates(meta, records, th):
    """d_loss ends near 0, against its balance level, while the generator's loss climbs."""
    levels = {"hinge": 2.0, "bce": LN2, "minimax": LN2, "lsgan": 0.25, "nsgan": 2 * LN2}
    balance = levels.get(loss_kind(meta, records))
    g_key = "g_adv" if any("g_adv" in r for r in records) else "g_loss"
    d, g, w = column(records, "d_loss"), column(records, g_key), window(len(records))
    if balance is None or len(finite(d)) < 2 or len(finite(g)) < 2:
        return []
    d_end, g_start, g_end = np.nanmean(d[-w:]), np.nanmean(g[:w]), np.nanmean(g[-w:])
    if d_end < th.d_low * balance and g_end - g_start > 0.1 * abs(g_start) + 0.05:
        return [
            f"D dominates: d_loss is {d_end:.3f} over the last {w} epochs, near 0 against its "
            f"balance {balance:.3f}, while {g_key} climbed from {g_start:.3f} to {g_end:.3f}. "
            "G's gradient is fading: slow D down (lower its lr, fewer D steps) or regularise "
            "it (R1)"
        ]
    return []


def d_stuck(meta, records, th):
    """Hinge d_loss (less R1's share) pinned near 2, or BCE D(x) and D(G(z)) both near 1/2."""
    kind, d = loss_kind(meta, records), column(records, "d_loss")
    if kind == "hinge":
        hinge = d.copy()
        for k in ("r1", "r2"):  # less the penalties' share
            hinge -= (penalty_weight(meta, k)[0] or 0) * np.nan_to_num(column(records, k))
        near = np.abs(hinge - 2.0) < th.pinned_tol
        what = f"the hinge part of d_loss stays within {th.pinned_tol} of 2 (D's logits near 0)"
    elif kind in ("bce", "minimax") and "d_real" in records[-1]:
        near_half = [np.abs(column(records, k) - 0.5) < th.pinned_tol for k in ("d_real", "d_fake")]
        near = near_half[0] & near_half[1]
        what = f"D(x) and D(G(z)) both stay within {th.pinned_tol} of 1/2"
    else:
        return []
    runs = "".join("1" if v else "0" for v in near).split("0")
    longest = max(len(r) for r in runs)
    if longest < th.stuck_epochs:
        return []
    start = "".join("1" if v else "0" for v in near).index("1" * th.stuck_epochs)
    ep = xs_of(records, "epoch")
    return [
        f"G dominates or D stopped learning: {what} for {longest} epochs from epoch "
        f"{ep[start]:g}. D cannot tell real from fake; check its learning rate and that it "
        "trains at all"
    ]


def ds_weight_zero(meta, records, th):
    """lambda_ds has reached 0: ds no longer enters g_loss."""
    lam = column(records, "lambda_ds")
    zero = np.flatnonzero(lam == 0)
    if not len(finite(lam)) or np.nanmax(lam) <= 0 or not len(zero):
        return []
    ep = xs_of(records, "epoch")
    return [
        f"the ds weight lambda_ds is 0 from epoch {ep[zero[0]]:g} on: from there ds no longer "
        "enters g_loss, and its curve is only watched"
    ]


def ds_collapse(meta, records, th):
    """ds falls below --ds_drop of its peak while lambda_ds still rewards it."""
    lam, ds, ep = column(records, "lambda_ds"), column(records, "ds"), xs_of(records, "epoch")
    live = np.flatnonzero((lam > 0) & np.isfinite(ds))
    if len(live) < 3:
        return []
    peak, last = int(live[np.argmax(ds[live])]), int(live[-1])
    if last > peak and ds[last] < th.ds_drop * ds[peak]:
        return [
            f"diversity is collapsing while it is still rewarded: ds fell from {ds[peak]:.4f} "
            f"(epoch {ep[peak]:g}) to {ds[last]:.4f} (epoch {ep[last]:g}) with lambda_ds still "
            f"{lam[last]:.3f}. Outputs stop depending on the style: raise w_ds or "
            "ds_decay_epochs"
        ]
    return []


def r1_share(meta, records, th):
    """What R1 (and R2) added to d_loss on average: their raw values are averaged with the steps
    without them."""
    out, d, w = [], column(records, "d_loss"), window(len(records))
    for key in ("r1", "r2"):
        r = column(records, key)
        weight, how = penalty_weight(meta, key)
        if not weight or not len(finite(r)) or np.nanmax(np.abs(r)) == 0:
            continue
        r_end, d_end = np.nanmean(r[-w:]), np.nanmean(d[-w:])
        share, k = weight * r_end, meta["config"].get("r1_interval", 1)
        zeros = f" (the raw penalty, 0 on {k - 1} of every {k} steps)" if k > 1 else ""
        out.append(
            f"{key} averages {r_end:.4g} over the last {w} epochs{zeros}; it adds {how} x "
            f"{r_end:.4g} = {share:.4g} to d_loss on average, "
            f"{100 * share / max(abs(d_end), 1e-12):.1f}% of d_loss {d_end:.3f}"
        )
    return out


def oscillation(meta, records, th):
    """A regular swing of d_loss or g_loss on top of its trend: period and amplitude."""
    out = []
    for key in ("d_loss", "g_loss"):
        v = finite(column(records, key))
        if len(v) < th.osc_min_records:
            continue
        t = np.arange(len(v))
        resid = v - np.polyval(np.polyfit(t, v, 1), t)
        if resid.std() == 0:
            continue
        ac = np.correlate(resid, resid, "full")[len(v) - 1 :] / (resid.var() * len(v))
        peaks = [
            L
            for L in range(2, len(v) // 2 + 1)
            if L + 1 < len(ac) and ac[L] > ac[L - 1] and ac[L] >= ac[L + 1]
        ]
        if not peaks or ac[peaks[0]] < th.osc_corr:
            continue
        amp = resid.std() * math.sqrt(2)  # a sine's amplitude from its std
        rel = amp / (np.abs(v).mean() + 1e-12)
        if rel > th.osc_rel:
            out.append(
                f"{key} swings with a period of about {peaks[0]} epochs and an amplitude of "
                f"{amp:.3g} ({100 * rel:.0f}% of its mean size; autocorrelation "
                f"{ac[peaks[0]]:.2f} at that lag): D and G are chasing each other; a lower "
                "learning rate usually damps it"
            )
    return out


def mode_collapse(meta, records, th):
    """At the last evaluation: fewer than --min_modes classes covered, or a coverage below
    --low_coverage of real data's (few real samples have a generated one near them)."""
    modes, cov, ep = column(records, "modes"), column(records, "coverage"), xs_of(records, "epoch")
    seen = np.flatnonzero(np.isfinite(modes) | np.isfinite(cov))
    if not len(seen):
        return []
    i = int(seen[-1])
    real = finite(column(records, "coverage_real"))
    low_cov = bool(np.isfinite(cov[i]) and len(real) and cov[i] < th.low_coverage * real[0])
    if not (modes[i] < th.min_modes or low_cov):
        return []
    said = [f"the samples cover {modes[i]:.0f} of 10 classes"] if modes[i] < th.min_modes else []
    if low_cov:
        real_text = f" against real data's {real[0]:.3f}" if len(real) else ""
        said.append(f"coverage is {cov[i]:.3f}{real_text}")
    figures = [
        f"{k} {column(records, k)[i]:.3g}"
        for k in ("kl_uniform", "fd", "fd_mean")
        if np.isfinite(column(records, k)[i])
    ]
    return [
        f"mode collapse: {' and '.join(said)} at epoch {ep[i]:g} ({', '.join(figures)}); "
        "the losses can look fine while this happens"
    ]


def diversity_collapse(meta, records, th):
    """div (different z, one source) below --div_drop of its peak: z no longer matters."""
    div, ep = column(records, "div"), xs_of(records, "epoch")
    idx = np.flatnonzero(np.isfinite(div))
    if len(idx) < 2:
        return []
    peak, last = int(idx[np.argmax(div[idx])]), int(idx[-1])
    if last > peak and div[last] < th.div_drop * div[peak]:
        return [
            f"diversity collapse: div fell from {div[peak]:.4g} (epoch {ep[peak]:g}) to "
            f"{div[last]:.4g} (epoch {ep[last]:g}): different z give the same translation"
        ]
    return []


def d_overfits(meta, records, th):
    """ada_rt, E[sign(D(x_ref))], above --rt_high in each of the last --overfit_epochs records."""
    rt, ep = column(records, "ada_rt"), xs_of(records, "epoch")
    idx = np.flatnonzero(np.isfinite(rt))[-th.overfit_epochs :]
    if len(idx) < th.overfit_epochs or not (rt[idx] > th.rt_high).all():
        return []
    on = meta["config"].get("ada_target") is not None
    return [
        f"D overfits: ada_rt = E[sign(D(x_ref))] stays above {th.rt_high:g} (from {rt[idx[0]]:.3f} "
        f"at epoch {ep[idx[0]]:g} to {rt[idx[-1]]:.3f} at epoch {ep[idx[-1]]:g}): D calls nearly "
        "every real latent real, as when it has memorised a small data set; "
        + (
            "ADA's p has not caught up (a smaller --ada_kimg moves it faster)"
            if on
            else "--ada_target 0.6 augments what D sees to hold it there"
        )
    ]


def augmentation_leaks(meta, records, th):
    """ada_p above --leak_p: StyleGAN2-ADA's augmentations begin to leak past about 0.8."""
    p, ep = column(records, "ada_p"), xs_of(records, "epoch")
    idx = np.flatnonzero(np.isfinite(p) & (p > th.leak_p))
    if not len(idx):
        return []
    top = int(idx[np.argmax(p[idx])])
    return [
        f"the augmentation may leak: ada_p reached {p[top]:.3f} at epoch {ep[top]:g} (above "
        f"{th.leak_p:g}); past about 0.8 G can learn to make augmented latents (mirrored, moved, "
        "cut out) since D sees them as often as not. Look at the samples; a higher --ada_target "
        "or more data keeps p lower"
    ]


def last_evaluated(records, keys):
    """(index, {key: value}) of the last record that holds any of keys; (None, {}) if none does."""
    for i in reversed(range(len(records))):
        found = {k: column(records, k)[i] for k in keys}
        found = {k: v for k, v in found.items() if np.isfinite(v)}
        if found:
            return i, found
    return None, {}


def source_ignored(meta, records, th):
    """At the last evaluation: content_ref or content_lat below --min_content. The translations
    then hardly depend on their source: G draws from the style (the reference's, or F's) alone."""
    i, found = last_evaluated(records, ("content_ref", "content_lat"))
    ep = xs_of(records, "epoch")
    low = {k: v for k, v in found.items() if v < th.min_content}
    if not low:
        return []
    paths = " and ".join({"content_ref": "by reference", "content_lat": "by z"}[k] for k in low)
    figures = ", ".join(f"{k} {v:.3f}" for k, v in found.items())
    return [
        f"G ignores its source {paths}: {figures} at epoch {ep[i]:g} (1: translations differ as "
        "their sources do; 0: the source does not matter). acc, fd and div can look fine while "
        "this happens; every source under one style comes out alike"
    ]


def one_look(meta, records, th):
    """At the last evaluation: style_lat or style_ref below --min_style (two z, or two
    references, give translations of nearly one style, where two real latents of the domain
    differ), or style_cov below --low_coverage of real data's (z does not reach the domain's
    styles: some style of the real data never comes out)."""
    i, found = last_evaluated(records, ("style_lat", "style_ref", "style_cov"))
    ep, real = xs_of(records, "epoch"), finite(column(records, "style_cov_real"))
    said = [
        f"one look {'by z' if k == 'style_lat' else 'by reference'}: {k} {v:.3f}"
        for k, v in found.items()
        if k != "style_cov" and v < th.min_style
    ]
    if "style_cov" in found and len(real) and found["style_cov"] < th.low_coverage * real[0]:
        said.append(
            f"z does not reach the domain's styles: style_cov {found['style_cov']:.3f} against "
            f"real data's {real[0]:.3f}"
        )
    if not said:
        return []
    figures = ", ".join(f"{k} {v:.3f}" for k, v in found.items())
    return [
        f"{'; '.join(said)} at epoch {ep[i]:g} ({figures}; style_lat and style_ref: 1 when two z "
        "or two references move a translation as far as two real latents of the domain differ, "
        "0 when not at all). div can look fine while this happens; sample several z for one "
        "source to see it"
    ]


FINDINGS = [
    divergence,
    d_dominates,
    d_stuck,
    ds_weight_zero,
    ds_collapse,
    r1_share,
    oscillation,
    mode_collapse,
    diversity_collapse,
    source_ignored,
    one_look,
    d_overfits,
    augmentation_leaks,
]


def diagnose(meta, records, th):
    """Every finding of every rule in FINDINGS, for one run."""
    if len(records) < 2:
        return divergence(meta, records, th)
    return [text for rule in FINDINGS for text in rule(meta, records, th)]


# -----------------------------------------------------------------------------
# the picture


def smooth(v, k):
    """Trailing moving average over k points, skipping NaN gaps."""
    if k <= 1:
        return v
    out = np.full_like(v, np.nan)
    for i in range(len(v)):
        win = finite(v[max(0, i - k + 1) : i + 1])
        if len(win) and np.isfinite(v[i]):
            out[i] = win.mean()
    return out


def title_of(meta, records, label):
    cfg = meta["config"]
    bits = [meta.get("script") or "records", label]
    if is_translation(meta, records):
        bits.append(f"adv_loss {cfg.get('adv_loss', 'hinge')}")
        weights = ("w_adv", "w_sty", "w_ds", "w_cyc", "w_id", "w_r1", "w_r2")
        bits.append(" ".join(f"{k} {cfg[k]:g}" for k in weights if k in cfg))
        bits.append(
            f"ds_decay_epochs {cfg.get('ds_decay_epochs')}, r1_interval {cfg.get('r1_interval')}"
        )
    elif cfg.get("loss"):
        extra = "".join(f", {k} {cfg[k]:g}" for k in ("r1", "r2", "gamma_end") if cfg.get(k))
        opt = cfg.get("optimizer", "")
        betas = f" betas ({cfg['b1']:g}, {cfg['b2']:g})" if opt == "adam" and "b1" in cfg else ""
        bits.append(
            f"loss {cfg['loss']}, {opt} lr {cfg.get('lr', 0):g}/{cfg.get('lr_d', 0):g} "
            f"(G/D){betas}, n_critic {cfg.get('n_critic')}{extra}"
        )
    return " | ".join(str(b) for b in bits if b)


def reference_note(runs, labels):
    """The evaluation's real-data figures of each run, said once when they are the same."""
    refs = []
    for (_, records), label in zip(runs, labels):
        ref = {k: finite(column(records, k)) for k in sorted(REFERENCE)}
        ref = {k: v[0] for k, v in ref.items() if len(v)}
        if ref:
            order = ("clf_acc", "fd_real", "kid_real", "is_real", "div_real", "coverage_real")
            text = ", ".join(f"{k} {ref[k]:.3g}" for k in order if k in ref)
            refs.append((label, "evaluation reference: " + text))
    if len({text for _, text in refs}) == 1 and len(refs) == len(runs):  # the same data: once
        return [refs[0][1]]
    return [(f"{label}: " if len(runs) > 1 else "") + text for label, text in refs]


def plot(runs, labels, out, x, k_smooth, footer):
    import matplotlib

    matplotlib.use("Agg")  # headless: no display, no window
    import matplotlib.pyplot as plt

    keys = [k for k in curve_keys(runs) if k not in REFERENCE]
    zero = [k for k in keys if all(not np.nan_to_num(column(r, k)).any() for _, r in runs)]
    inside = {k: domain_panel(k, keys) for k in keys if domain_panel(k, keys)}  # per domain
    keys = [k for k in keys if k not in zero and k not in inside]
    ncol = min(4, max(1, len(keys)))
    nrow = max(1, math.ceil(len(keys) / ncol))
    size = (4.2 * ncol, 2.7 * nrow + 0.9 + 0.22 * len(footer))
    fig, axes = plt.subplots(nrow, ncol, figsize=size, sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = {}
    for ax, key in zip(axes.flat, keys):
        for j, ((meta, records), label) in enumerate(zip(runs, labels)):
            xs, ys = xs_of(records, x), column(records, key)
            c = colors[j % len(colors)]
            if np.isfinite(ys).sum() < 0.5 * len(ys):  # evaluation figures: every few epochs
                m = np.isfinite(ys)
                ax.plot(xs[m], ys[m], "o-", color=c, ms=3, lw=1.2, label=label)
            elif k_smooth > 1:
                ax.plot(xs, ys, color=c, alpha=0.25, lw=0.8)
                ax.plot(xs, smooth(ys, k_smooth), color=c, lw=1.4, label=label)
            else:
                ax.plot(xs, ys, color=c, lw=1.4, marker="." if len(ys) < 30 else None, label=label)
            mine = [k for k, panel in inside.items() if panel == key]
            if mine and len(runs) == 1:  # each domain's figure, thin, under the mean
                for dk in mine:
                    m = np.isfinite(column(records, dk))
                    ax.plot(xs[m], column(records, dk)[m], lw=0.8, alpha=0.7, label=dk)
                ax.legend(fontsize=6)
            for y, text in reference_lines(meta, key, records):
                if (y, text) not in drawn.setdefault(key, set()):  # each level once
                    drawn[key].add((y, text))
                    ax.axhline(y, color="0.45", ls="--", lw=0.9)
                    xy = ("axes fraction", "data")
                    ax.annotate(text, (0.01, y), xycoords=xy, fontsize=7, color="0.35", va="bottom")
            lz = lambda_zero_x(meta, records, x)
            if key in ("ds", "lambda_ds", "g_loss") and lz is not None and lz <= np.nanmax(xs):
                ax.axvline(lz, color=c, ls=":", lw=1)
                xy = ("data", "axes fraction")
                ax.annotate(
                    "lambda_ds = 0",
                    (lz, 0.97),
                    xycoords=xy,
                    fontsize=7,
                    color=c,
                    ha="right",
                    va="top",
                )
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.25)
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel(x, fontsize=9)
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    if len(runs) == 1:
        head = title_of(*runs[0], labels[0])
    else:
        each = [
            f"{lb} ({title_of(m, r, lb).split(' | ', 2)[-1]})" for (m, r), lb in zip(runs, labels)
        ]
        head = f"{len(runs)} runs: " + ", ".join(each)
    notes = reference_note(runs, labels)
    if zero:
        notes.append(f"constant 0 (not drawn): {', '.join(zero)}")
    if notes:
        head += "\n" + "; ".join(notes)
    fig.suptitle(head, fontsize=10)
    if footer:
        fig.text(
            0.01,
            0.005,
            "\n".join(footer),
            fontsize=7.5,
            va="bottom",
            ha="left",
            wrap=True,
            family="monospace",
        )
    top = 1 - (0.9 + 0.2 * bool(notes)) / fig.get_figheight()
    bottom = (0.5 + 0.22 * len(footer)) / fig.get_figheight()
    fig.subplots_adjust(top=top, bottom=bottom, hspace=0.45, wspace=0.28, left=0.05, right=0.98)
    fig.savefig(out, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------


def main(argv=None):
    args = build_parser().parse_args(argv)
    runs = []
    for path in args.logs:
        try:
            runs.append(read_log(path))
        except LogError as e:
            die(str(e))
    folders = [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in args.logs]
    labels = args.labels.split(",") if args.labels else folders
    if len(labels) != len(runs):
        die(f"--labels names {len(labels)} runs, {len(runs)} logs were given")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.logs[0])), "losses.png")
    if not args.no_plot and os.path.splitext(out)[1].lower() not in (".png", ".svg", ".pdf"):
        die(f"--out {out}: the extension picks the format: .png, .svg or .pdf")
    findings = []
    if args.diagnose or args.annotate:
        for (meta, records), label in zip(runs, labels):
            found = diagnose(meta, records, args)
            findings += [f"[{label}] {text}" for text in found] or [
                f"[{label}] no findings: nothing the rules look for"
            ]
    if args.diagnose:
        print("\n".join(findings))
    if not args.no_plot:
        plot(runs, labels, out, args.x, args.smooth, findings if args.annotate else [])
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
