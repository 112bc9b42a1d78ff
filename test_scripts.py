"""Each script end to end, as a user runs it: a subprocess with tiny flags, on tiny data the tests
write. Mistakes whose only question is the one line they get, and runs compared with each other bit
for bit, run in-process, through the same main() the command line runs, which spares an
interpreter start each.

    python -m pytest -q test_scripts.py

Nothing here touches the network: downloads go to a server on 127.0.0.1 that the test starts, or
to a closed port. GPU-only tests are skipped where there is no CUDA.
"""

import contextlib
import functools
import gzip
import hashlib
import http.server
import importlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import posed_fashion as pf
from posed_fashion import FASHION, TINY_VAE, save_tiny_vae

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
CUDA = torch.cuda.is_available()
SCRIPTS = ["train_mnist_gan.py", "train_latent_stargan.py", "encode_latents.py", "plot_losses.py"]
PRDC = ("precision", "recall", "density", "coverage")
# Intel MKL picks its code paths at run time, and on a busy machine a process sometimes takes
# another one: float32 results then differ in the last bits, and a training run drifts from
# there (seen: 1 resume in 14 from one checkpoint on 2 loaded cores). Conditional bitwise
# reproducibility fixes the path in every script the tests start: "exact" compares like with like.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def run(script, *args, check=True, timeout=300, cwd=None, env=None):
    """Run a script of the project; return the CompletedProcess (stdout and stderr as text)."""
    cmd = [PY, os.path.join(HERE, script), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout[-3000:]}\n"
            f"{p.stderr[-3000:]}"
        )
    return p


def call(script, *args):
    """A script's main() in this process, as its command line runs it: (returncode, stdout,
    stderr) in a CompletedProcess. For mistakes whose one line is the whole question, and runs
    compared with each other."""
    module = importlib.import_module(script[: -len(".py")])
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main(list(map(str, args)))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the trainers set their own
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def assert_one_line_error(p, *needles):
    """A user mistake: non-zero exit, one line on stderr, no traceback, saying what to do."""
    assert p.returncode != 0, p.stdout
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def load_log(out_dir):
    with open(os.path.join(out_dir, "log.json")) as f:
        return json.load(f)


def load_pt(path):
    return torch.load(path, weights_only=True)


# -----------------------------------------------------------------------------
# tiny MNIST-format data: class k is a bright bar at a position and angle of its own, plus noise


def write_idx(path, array):
    """array uint8 of rank 1 (labels) or 3 (images) -> an IDX file, gzipped if path ends in .gz."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(
        ">" + "I" * array.ndim, *array.shape
    )
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(data)


def make_digits(n, seed, size=28):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    imgs = np.zeros((n, size, size), np.float32)
    for i, k in enumerate(labels):
        angle = np.pi * k / 10
        d = np.abs((xx - size / 2) * np.sin(angle) - (yy - size / 2) * np.cos(angle))
        imgs[i] = 220 * (d < 2.5) * (np.hypot(xx - size / 2, yy - size / 2) < 11)
    imgs += rng.normal(0, 12, imgs.shape)
    return np.clip(imgs, 0, 255).astype(np.uint8), labels


IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def write_tiny_mnist(folder, n_train=512, n_test=256, gz=True):
    os.makedirs(folder, exist_ok=True)
    x, y = make_digits(n_train, 0)
    xt, yt = make_digits(n_test, 1)
    for name, arr in zip(IDX_NAMES, (x, y, xt, yt)):
        write_idx(os.path.join(folder, name + (".gz" if gz else "")), arr)
    return folder


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    return write_tiny_mnist(str(tmp_path_factory.mktemp("tiny_mnist")))


def mnist_args(data_dir, out_dir, *extra):
    return [
        "--data_dir",
        data_dir,
        "--out_dir",
        out_dir,
        "--batch_size",
        32,
        "--log_interval",
        4,
        "--sample_interval",
        8,
        "--device",
        "cpu",
        "--seed",
        1,
        "--eval_interval",
        0,
        *extra,
    ]


@pytest.fixture(scope="session")
def mnist_classifier(tiny_mnist, tmp_path_factory):
    """The tiny MNIST set's evaluation classifier, trained once: a run finds it in its cache."""
    out = str(tmp_path_factory.mktemp("clf"))
    call(
        "train_mnist_gan.py",
        *mnist_args(tiny_mnist, out, "--max_iters", 1, "--eval_interval", 1, "--eval_samples", 200),
    )
    (name,) = [f for f in os.listdir(out) if f.startswith("classifier_")]
    return os.path.join(out, name)


def with_classifier(out_dir, classifier):
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(classifier, out_dir)
    return str(out_dir)


def check_grid(path, size=304):
    """A 5x5 grid of 28px images, 2px padding, scaled 2x: present, the right size, not blank."""
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert img.shape == (size, size), img.shape
    cells = img[4:60, 4:60]  # the first image, inside the padding
    assert img.std() > 5 and cells.std() > 1, (img.std(), cells.std())


# -----------------------------------------------------------------------------
# train_mnist_gan.py

LOSS_KEYS = {
    "bce": [],
    "minimax": [],
    "wgan": [],
    "wgan-gp": ["gp"],
    "hinge": [],
    "lsgan": [],
    "rpgan": ["r1", "r2"],
}


@pytest.mark.parametrize("loss", sorted(LOSS_KEYS))
def test_mnist_gan_trains_with_every_loss(tiny_mnist, tmp_path, loss):
    out = str(tmp_path / loss)
    p = run("train_mnist_gan.py", *mnist_args(tiny_mnist, out, "--loss", loss, "--epochs", 2))
    assert "img/s" in p.stdout.splitlines()[-1]
    log = load_log(out)
    assert log["script"] == "train_mnist_gan.py"
    cfg = log["config"]
    assert cfg["loss"] == loss and cfg["batch_size"] == 32 and cfg["epochs"] == 2
    for k in (
        "lr",
        "lr_d",
        "b1",
        "b2",
        "n_critic",
        "optimizer",
        "clip_value",
        "lambda_gp",
        "r1",
        "seed",
        "dtype",
        "compile",
    ):
        assert k in cfg, k
    assert [r["epoch"] for r in log["records"]] == [1, 2]
    assert [r["step"] for r in log["records"]] == [16, 32]  # 512 images // 32 per step
    keys = {"epoch", "step", "d_loss", "g_loss", "d_real", "d_fake", "imgs_per_sec", "time"}
    keys |= set(LOSS_KEYS[loss])
    for r in log["records"]:
        assert set(r) == keys, set(r) ^ keys
        assert all(np.isfinite(v) for v in r.values())
    if loss in ("bce", "minimax", "lsgan"):  # probabilities there, raw critic scores elsewhere
        assert all(0 < r["d_real"] < 1 and 0 < r["d_fake"] < 1 for r in log["records"])
    samples = sorted(os.listdir(os.path.join(out, "samples")))
    assert samples == ["000000.png", "000008.png", "000016.png", "000024.png", "000032.png"]
    check_grid(os.path.join(out, "samples", "000032.png"))


def test_mnist_gan_defaults_follow_each_loss(tiny_mnist, tmp_path):
    out = str(tmp_path / "wgan")
    run("train_mnist_gan.py", *mnist_args(tiny_mnist, out, "--loss", "wgan", "--max_iters", 10))
    cfg = load_log(out)["config"]
    assert (cfg["optimizer"], cfg["lr"], cfg["n_critic"], cfg["clip_value"]) == (
        "rmsprop",
        5e-5,
        5,
        0.01,
    )
    ck = load_pt(os.path.join(out, "ckpt.pt"))
    assert all(v.abs().max() <= 0.01 + 1e-9 for v in ck["D"].values())  # every D weight clipped
    # --lr sets both rates where the loss's defaults use one (seed 004); --lr_d sets D's apart
    for loss, flags, lrs in (
        ("wgan-gp", ["--lr", 3e-4], (3e-4, 3e-4)),
        ("bce", ["--lr", 1e-3, "--lr_d", 5e-4], (1e-3, 5e-4)),
        ("hinge", ["--lr", 3e-4], (3e-4, 4e-4)),
    ):
        out = str(tmp_path / loss)
        call(
            "train_mnist_gan.py",
            *mnist_args(tiny_mnist, out, "--loss", loss, "--max_iters", 2, *flags),
        )
        cfg = load_log(out)["config"]
        assert (cfg["lr"], cfg["lr_d"]) == lrs, loss
        ck = load_pt(os.path.join(out, "ckpt.pt"))
        assert [ck[k]["param_groups"][0]["lr"] for k in ("opt_G", "opt_D")] == list(lrs)
    assert (cfg["b1"], cfg["b2"], cfg["n_critic"]) == (0.0, 0.9, 1)  # hinge's
    p = call("train_mnist_gan.py", "--help")
    assert "wgan-gp: adam, lr 0.0001, lr_d 0.0001, b1 0, b2 0.9, n_critic 5" in " ".join(
        p.stdout.split()
    )


def test_mnist_gan_r1_and_n_critic(tiny_mnist, tmp_path):
    out = str(tmp_path / "r1")
    flags = ["--loss", "hinge", "--r1", 10, "--n_critic", 2, "--epochs", 1]
    run("train_mnist_gan.py", *mnist_args(tiny_mnist, out, *flags))
    r = load_log(out)["records"][0]
    assert r["r1"] > 0 and np.isfinite(r["r1"])
    ck = load_pt(os.path.join(out, "ckpt.pt"))
    # 16 D steps, G on every second one: Adam's step count says how often each optimizer stepped
    assert (
        ck["opt_D"]["state"][0]["step"].item() == 16 and ck["opt_G"]["state"][0]["step"].item() == 8
    )


def check_profile(p, out, steps, end):
    """--profile: the line that says where a step's time went, the two files, and a throughput
    that leaves the profiled steps out."""
    assert f"profile: steps 10..{10 + steps}, " in p.stdout and "ms a step" in p.stdout, p.stdout
    with open(os.path.join(out, "profile.txt")) as f:
        table = f.read()
    assert "Self CPU" in table and "aten::" in table, table[:500]
    with open(os.path.join(out, "profile.json")) as f:
        assert json.load(f)["traceEvents"]
    assert f"(steps {10 + steps}..{end}, training loop only)" in p.stdout.splitlines()[-1]


def test_mnist_gan_profile(tiny_mnist, tmp_path):
    out = str(tmp_path / "p")
    p = run("train_mnist_gan.py", *mnist_args(tiny_mnist, out, "--epochs", 1, "--profile", 3))
    check_profile(p, out, 3, 16)
    # a profile the run is too short for: said before any work, with what to change
    p = call("train_mnist_gan.py", *mnist_args(tiny_mnist, out, "--max_iters", 12, "--profile", 3))
    assert_one_line_error(p, "--profile 3", "at least 13 steps")


def records_losses(log):
    return [
        [r[k] for k in ("epoch", "step", "d_loss", "g_loss", "d_real", "d_fake")]
        for r in log["records"]
    ]


def test_mnist_gan_resume_is_exact(tiny_mnist, mnist_classifier, tmp_path):
    # with an evaluation every epoch: loading the cached classifier in the middle of run b (which
    # builds a module) must not move training's RNG
    a, b, c = (
        with_classifier(tmp_path / d, mnist_classifier) for d in ("straight", "resumed", "mid")
    )
    ev = ["--eval_interval", 1, "--eval_samples", 200]
    run("train_mnist_gan.py", *mnist_args(tiny_mnist, a, "--epochs", 3, *ev))
    run("train_mnist_gan.py", *mnist_args(tiny_mnist, b, "--epochs", 1, *ev))
    p = run(
        "train_mnist_gan.py", "--resume", "--out_dir", b, "--epochs", 3
    )  # the rest: the checkpoint's
    assert "resumed from" in p.stdout and "at step 16" in p.stdout
    assert "resume: --epochs changed from 1 to 3" in p.stdout
    assert "evaluation classifier: trained" not in p.stdout  # the cached classifier is reused
    fd = [r["fd"] for r in load_log(a)["records"]]
    assert [r["fd"] for r in load_log(b)["records"]] == pytest.approx(fd, rel=1e-6)
    run(
        "train_mnist_gan.py", *mnist_args(tiny_mnist, c, "--epochs", 3, "--max_iters", 5, *ev)
    )  # epoch 1
    run("train_mnist_gan.py", "--resume", "--out_dir", c, "--max_iters", 0)
    ref = records_losses(load_log(a))
    ka = load_pt(os.path.join(a, "ckpt.pt"))
    for other in (b, c):
        np.testing.assert_allclose(records_losses(load_log(other)), ref, rtol=1e-6, atol=1e-7)
        kb = load_pt(os.path.join(other, "ckpt.pt"))
        for net in ("G", "D"):
            for k in ka[net]:
                torch.testing.assert_close(kb[net][k], ka[net][k], rtol=1e-6, atol=1e-7)


def test_mnist_gan_resume_refuses_what_it_cannot_continue(tiny_mnist, tmp_path):
    out = str(tmp_path / "r")
    call(
        "train_mnist_gan.py", *mnist_args(tiny_mnist, out, "--epochs", 2, "--max_iters", 5)
    )  # mid-epoch
    p = call("train_mnist_gan.py", "--resume", "--out_dir", out, "--batch_size", 16)
    assert_one_line_error(
        p, "--batch_size 16 differs from the checkpoint's 32", "resume with --batch_size 32"
    )
    p = call("train_mnist_gan.py", "--resume", "--out_dir", out, "--r1", 1)
    assert_one_line_error(p, "--r1 1 turns R1 on inside an epoch", "--r1 0")
    p = call("train_mnist_gan.py", "--resume", "--out_dir", out, "--loss", "wgan")
    assert_one_line_error(p, "--loss wgan differs from the checkpoint's bce", "new --out_dir")
    # at an epoch's end the sums are empty: --r1 can start there
    call("train_mnist_gan.py", "--resume", "--out_dir", out, "--max_iters", 0, "--epochs", 1)
    p = call("train_mnist_gan.py", "--resume", "--out_dir", out, "--epochs", 2, "--r1", 1)
    assert p.returncode == 0, p.stderr
    recs = load_log(out)["records"]
    assert [r["epoch"] for r in recs] == [1, 2] and "r1" not in recs[0] and recs[1]["r1"] > 0


def test_mnist_gan_ctrl_c_saves_and_resumes(tiny_mnist, tmp_path):
    a, b = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    args = mnist_args(
        tiny_mnist, b, "--epochs", 12, "--log_interval", 16, "--sample_interval", 10000
    )
    cmd = [PY, os.path.join(HERE, "train_mnist_gan.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is under way, then press Ctrl-C
        if line.startswith("epoch 2/"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted at step" in out and "--resume" in out
    stopped = load_pt(os.path.join(b, "ckpt.pt"))["step"]
    assert 32 <= stopped < 192
    run("train_mnist_gan.py", "--resume", "--out_dir", b)
    run(
        "train_mnist_gan.py",
        *mnist_args(
            tiny_mnist, a, "--epochs", 12, "--log_interval", 16, "--sample_interval", 10000
        ),
    )
    np.testing.assert_allclose(
        records_losses(load_log(b)), records_losses(load_log(a)), rtol=1e-6, atol=1e-7
    )


MNIST_EVAL = {"fd", "kid", "is", "modes", "kl_uniform", *PRDC}
MNIST_EVAL_ONCE = {"clf_acc", "fd_real", "kid_real", "is_real", *(f"{m}_real" for m in PRDC)}


def test_mnist_gan_evaluation_in_the_log(tiny_mnist, mnist_classifier, tmp_path):
    out = with_classifier(tmp_path / "ev", mnist_classifier)
    flags = ["--epochs", 3, "--eval_interval", 2, "--eval_samples", 300, "--min_clf_acc", 1.01]
    p = run("train_mnist_gan.py", *mnist_args(tiny_mnist, out, *flags))
    assert p.stdout.count("eval epoch") == 2  # epoch 2, and the end of the run (epoch 3)
    warning = [line for line in p.stderr.splitlines() if line.startswith("warning")]
    assert (
        len(warning) == 1
        and "< --min_clf_acc 1.01): fd, kid, is and modes mean little" in warning[0]
    )
    recs = load_log(out)["records"]
    assert MNIST_EVAL | MNIST_EVAL_ONCE <= set(recs[1]) and not (
        MNIST_EVAL | MNIST_EVAL_ONCE
    ) & set(recs[0])
    assert MNIST_EVAL <= set(recs[2]) and not MNIST_EVAL_ONCE & set(recs[2])  # the reference: once
    assert recs[1]["clf_acc"] > 0.9  # the tiny set's classes are easy: the figures mean something


def evaluator_on_tiny_mnist(tiny_mnist, mnist_classifier, out_dir, **over):
    import train_mnist_gan as mnist

    arrays = mnist.load_dataset("mnist", tiny_mnist)
    cfg = dict(out_dir=with_classifier(out_dir, mnist_classifier), seed=0, latent_dim=4)
    cfg.update(eval_samples=256, mode_share=0.02, min_clf_acc=0.8, **over)
    data = mnist.to_device(arrays[0], torch.device("cpu"))
    return (
        mnist,
        arrays,
        data,
        mnist.SampleEvaluator(cfg, arrays, data, torch.device("cpu"), contextlib.nullcontext()),
    )


class Oracle(torch.nn.Module):
    """A generator that returns real images, chosen by z: what a perfect G would give."""

    def __init__(self, images):
        super().__init__()
        self.images = images

    def forward(self, z):
        i = (z[:, 0].abs() * 1e6).long() % len(self.images)
        return self.images[i].view(len(z), 1, 28, 28)


def test_mnist_evaluation_discriminates(tiny_mnist, mnist_classifier, tmp_path):
    # a G that draws real held-out images reads as real data; a G with one output reads collapsed
    mnist, arrays, data, ev = evaluator_on_tiny_mnist(tiny_mnist, mnist_classifier, tmp_path / "e")
    ev.setup()
    real = ev(Oracle(mnist.to_device(arrays[2], torch.device("cpu"))), 1)  # the test set itself
    assert real["fd"] < 2 * ev.reference["fd_real"] + 1 and real["modes"] == 10
    assert (
        real["is"] == pytest.approx(ev.reference["is_real"], rel=0.1) and real["kl_uniform"] < 0.05
    )
    one = ev(Oracle(data[:1]), 1)  # every sample the same image
    assert one["modes"] == 1 and one["is"] == pytest.approx(1.0, abs=1e-6)
    assert one["kl_uniform"] == pytest.approx(
        np.log(10), rel=1e-9
    )  # one class: KL to uniform = ln 10
    assert one["fd"] > 20 * real["fd"] and one["kid"] > 20 * max(real["kid"], 1e-3)
    half = ev(Oracle(data[torch.from_numpy(arrays[1] < 5)]), 1)  # real images of 5 classes
    assert half["modes"] == 5 and real["fd"] < half["fd"] < one["fd"]


def test_mnist_gan_nan_stops_and_keeps_the_checkpoint(tiny_mnist, tmp_path):
    out = str(tmp_path / "nan")
    call("train_mnist_gan.py", *mnist_args(tiny_mnist, out, "--epochs", 1))
    before = load_pt(os.path.join(out, "ckpt.pt"))
    p = run(
        "train_mnist_gan.py", "--resume", "--out_dir", out, "--epochs", 3, "--lr", 1e30, check=False
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert (
        "non-finite" in last
        and "at step 1" in last
        and "last good checkpoint" in last
        and "step 16" in last
    )
    after = load_pt(os.path.join(out, "ckpt.pt"))
    assert after["step"] == 16
    torch.testing.assert_close(after["G"], before["G"])
    assert [r["step"] for r in load_log(out)["records"]] == [16]


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--batch_size", 0], "argument --batch_size: must be at least 1, got 0"),
        (["--batch_size", 1], "BatchNorm needs 2 samples"),
        (["--epochs", 0], "argument --epochs: must be at least 1, got 0"),
        (["--lr", -1], "argument --lr: must be positive, got -1"),
        (["--b1", 1.5], "argument --b1: must be in [0, 1), got 1.5"),
        (["--r1", -2], "argument --r1: must be zero or positive, got -2"),
        (["--epochs", "ten"], "argument --epochs: invalid positive_int value: 'ten'"),
        (["--loss", "nope"], "argument --loss: invalid choice: 'nope'"),
        (["--nope"], "unrecognized arguments: --nope"),
        (["--batch_size", 100000], "larger than the training set (512 images)"),
        (["--device", "tpu9"], "--device tpu9"),
        (["--cuda_graph"], "--cuda_graph needs a CUDA device"),
    ],
)
def test_mnist_gan_impossible_flags(tiny_mnist, tmp_path, flags, needle):
    p = call("train_mnist_gan.py", *mnist_args(tiny_mnist, str(tmp_path / "o")), *flags)
    assert_one_line_error(p, needle)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_gives_a_mistyped_flag_one_line(script, tmp_path):
    # the real command line, for each script: argparse's own error, as one line
    needed = {"plot_losses.py": ["x.json"], "encode_latents.py": ["--images", "x"]}.get(script, [])
    p = run(script, *needed, "--no_such_flag", check=False)
    assert_one_line_error(p, f"{script}: error: unrecognized arguments: --no_such_flag")


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_mnist_gan_cuda_requested_without_cuda(tiny_mnist, tmp_path):
    p = call("train_mnist_gan.py", *mnist_args(tiny_mnist, str(tmp_path / "o")), "--device", "cuda")
    assert_one_line_error(p, "CUDA is not available", "--device cpu")


def test_mnist_gan_resume_errors(tiny_mnist, tmp_path):
    out = tmp_path / "r"
    p = call("train_mnist_gan.py", *mnist_args(tiny_mnist, str(out)), "--resume")
    assert_one_line_error(p, "no checkpoint at", "start without --resume")
    os.makedirs(out)
    torch.save({"weights": torch.zeros(3)}, out / "ckpt.pt")
    p = call("train_mnist_gan.py", *mnist_args(tiny_mnist, str(out)), "--resume")
    assert_one_line_error(p, "is not a checkpoint of train_mnist_gan.py")
    (out / "ckpt.pt").write_bytes(b"not a torch file")
    p = call("train_mnist_gan.py", *mnist_args(tiny_mnist, str(out)), "--resume")
    assert_one_line_error(p, "cannot be loaded")


def test_mnist_gan_missing_data_offline(tmp_path):
    # port 9 on loopback: nothing listens there, so the download fails at once, as it does offline
    p = call(
        "train_mnist_gan.py",
        "--data_dir",
        tmp_path / "empty",
        "--mirror",
        "http://127.0.0.1:9/",
        "--out_dir",
        tmp_path / "o",
        "--device",
        "cpu",
    )
    line = assert_one_line_error(
        p,
        "mnist not found in",
        "download failed",
        "Put train-images-idx3-ubyte.gz",
        "--dataset fashion",
    )
    assert str(tmp_path / "empty") in line


def corrupt_idx_sets(folder):
    """Yield (description, data_dir, expected message) for IDX files broken as downloads break."""
    for case, needle in (
        ("magic", "bad magic number"),
        ("truncated", "truncated or corrupt"),
        ("gzip", "cannot be read"),
        ("halfgzip", "cannot be read"),
        ("labels", "labels"),
    ):
        d = write_tiny_mnist(os.path.join(folder, case), n_train=64, n_test=32)
        path = os.path.join(d, "train-images-idx3-ubyte.gz")
        raw = gzip.decompress(open(path, "rb").read())
        if case == "magic":
            raw = b"\x00\x00\x08\x09" + raw[4:]
        elif case == "truncated":
            raw = raw[: len(raw) // 2]
        if case == "gzip":
            open(path, "wb").write(os.urandom(2000))
        elif case == "halfgzip":
            whole = gzip.compress(raw)
            open(path, "wb").write(whole[: len(whole) // 2])
        elif case == "labels":  # 64 images, 30 labels
            write_idx(os.path.join(d, "train-labels-idx1-ubyte.gz"), np.zeros(30, np.uint8))
        else:
            open(path, "wb").write(gzip.compress(raw))
        yield case, d, needle


def test_mnist_gan_corrupt_idx_files(tmp_path):
    for _, d, needle in corrupt_idx_sets(str(tmp_path)):
        p = call(
            "train_mnist_gan.py",
            "--data_dir",
            d,
            "--out_dir",
            tmp_path / "o",
            *"--device cpu --mirror http://127.0.0.1:9/".split(),
        )
        assert_one_line_error(p, needle)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(QuietHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_mnist_download_checks_md5(loopback_server, tmp_path):
    import train_mnist_gan as mnist

    www, url = loopback_server
    payload = gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x01\x02\x03")
    (www / "t10k-labels-idx1-ubyte.gz").write_bytes(payload)
    good = hashlib.md5(payload).hexdigest()
    dest = tmp_path / "data"
    # the right MD5: the file lands in place, whole, with no temporary file left behind
    path = mnist.download("t10k-labels-idx1-ubyte.gz", good, str(dest), [url])
    assert open(path, "rb").read() == payload and os.listdir(dest) == ["t10k-labels-idx1-ubyte.gz"]
    assert list(mnist.read_idx(path)) == [1, 2, 3]
    # a wrong MD5 (a mirror serving something else): nothing is kept
    os.remove(path)
    with pytest.raises(ValueError, match="MD5"):
        mnist.download(
            "t10k-labels-idx1-ubyte.gz", "0" * 32, str(dest), ["http://127.0.0.1:9/", url]
        )
    assert os.listdir(dest) == []
    # the script: a mirror that serves the tiny set, whose MD5s are not MNIST's, is refused
    write_tiny_mnist(str(www), n_train=64, n_test=32)
    p = call(
        "train_mnist_gan.py",
        "--data_dir",
        dest,
        "--mirror",
        url,
        "--out_dir",
        tmp_path / "o",
        "--device",
        "cpu",
    )
    assert_one_line_error(p, "MD5", "expected f68b3c2dcbeaaa9fbdd348bbdeb94873")
    assert os.listdir(dest) == []


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="apt-get install dataset-fashion-mnist")
def test_mnist_gan_finds_debian_fashion_mnist(tmp_path):
    out = str(tmp_path / "f")
    p = run(
        *"train_mnist_gan.py --dataset fashion --data_dir".split(),
        tmp_path / "nothing_here",
        "--mirror",
        "http://127.0.0.1:9/",
        "--out_dir",
        out,
        *"--max_iters 3 --eval_interval 0 --device cpu".split(),
    )
    assert "60000 images, 937 steps/epoch" in p.stdout
    assert load_log(out)["records"][0]["step"] == 3


def test_mnist_gan_uncompressed_idx_and_torchvision_layout(tmp_path):
    d = write_tiny_mnist(str(tmp_path / "data" / "MNIST" / "raw"), n_train=64, n_test=32, gz=False)
    p = call(
        "train_mnist_gan.py",
        "--data_dir",
        tmp_path / "data",
        "--out_dir",
        tmp_path / "o",
        *"--max_iters 2 --batch_size 16 --device cpu --eval_interval 0".split(),
        *["--mirror", "http://127.0.0.1:9/"],
    )
    assert p.returncode == 0, p.stderr
    assert "64 images" in p.stdout and os.path.exists(os.path.join(d, "train-images-idx3-ubyte"))


def test_mnist_gan_compiled_bf16_path_on_cpu(tiny_mnist, tmp_path, monkeypatch):
    # The CUDA configuration (torch.compile of G and D + bf16 autocast, GP and R1 through the raw D)
    # in-process on the CPU. The aot_eager backend traces and differentiates the same graphs as on
    # a GPU; only the code generation, which takes minutes on a CPU, is left out.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    out = str(tmp_path / "c")
    flags = ["--compile", "--dtype", "bfloat16", "--max_iters", 12, "--r1", 1, "--loss", "wgan-gp"]
    p = call("train_mnist_gan.py", *mnist_args(tiny_mnist, out, *flags))
    assert p.returncode == 0, p.stderr
    assert "bfloat16 compiled" in p.stdout
    r = load_log(out)["records"][0]
    assert r["step"] == 12 and all(np.isfinite(r[k]) for k in ("d_loss", "g_loss", "gp", "r1"))
    assert load_log(out)["config"]["compile"] is True
    ck = load_pt(os.path.join(out, "ckpt.pt"))
    assert not any(k.startswith("_orig_mod") for k in ck["G"])  # the raw module's weights


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_mnist_gan_on_gpu(tiny_mnist, tmp_path):
    out = str(tmp_path / "gpu")
    p = run(
        "train_mnist_gan.py",
        *mnist_args(tiny_mnist, out, "--epochs", 3, "--device", "cuda"),
        timeout=600,
    )
    assert "bfloat16 compiled cuda-graph" in p.stdout
    assert all(np.isfinite(r["d_loss"]) for r in load_log(out)["records"])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("loss", ["bce", "wgan-gp"])  # wgan-gp: two kinds of step, RNG, 2nd order
def test_mnist_gan_cuda_graph_on_gpu_trains_as_the_step_does(
    tiny_mnist, mnist_classifier, tmp_path, loss
):
    # the replayed step computes what the step computes: the same losses and evaluation, epoch by
    # epoch, across a resume too (the graphs are captured again after the checkpoint's load)
    flags = "--device cuda --dtype float32 --eval_interval 1 --eval_samples 300 --loss".split()
    graph, plain = (with_classifier(tmp_path / k, mnist_classifier) for k in ("graph", "plain"))
    for out, extra in (
        (graph, ["--epochs", 2, "--cuda_graph"]),
        (graph, ["--epochs", 3, "--cuda_graph", "--resume"]),
        (plain, ["--epochs", 3, "--no-cuda_graph"]),
    ):
        run("train_mnist_gan.py", *mnist_args(tiny_mnist, out, *flags, loss, *extra), timeout=600)
    logs = [load_log(out) for out in (graph, plain)]
    np.testing.assert_allclose(*map(records_losses, logs), rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(*([r["fd"] for r in log["records"]] for log in logs), rtol=1e-2)


# -----------------------------------------------------------------------------
# encode_latents.py, with a tiny randomly initialised VAE saved and loaded the way a real one is

# Stable Diffusion's VAE (sd-vae-ft-mse), randomly initialised: for the GPU throughput check only
SD_VAE = dict(
    TINY_VAE,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=256,
)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    return save_tiny_vae(str(tmp_path_factory.mktemp("tiny_vae")))


def make_image_tree(root):
    """cat/dog/wild folders of small images in several formats and shapes, one corrupt file, one
    non-image."""
    rng = np.random.default_rng(0)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
    for d, (w, h) in (("cat", (40, 32)), ("dog", (32, 48)), ("wild", (64, 64))):
        os.makedirs(os.path.join(root, d, "sub"), exist_ok=True)
        for i, ext in enumerate([".png", ".jpg", ".webp", ".bmp", ".png"]):
            arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            img = Image.fromarray(arr).convert("L") if i == 4 else Image.fromarray(arr)  # one gray
            img.save(os.path.join(root, d, f"{i}{ext.upper() if i == 1 else ext}"), fmt[ext])
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(root, d, "sub", "deep.png"))
    open(os.path.join(root, "dog", "broken.jpg"), "wb").write(
        b"\xff\xd8\xff\xe0 not really a jpeg" * 10
    )
    open(os.path.join(root, "cat", "notes.txt"), "w").write("not an image")
    open(os.path.join(root, "cat", ".DS_Store"), "wb").write(b"\0\0")
    return root


@pytest.fixture
def image_tree(tmp_path):
    return make_image_tree(str(tmp_path / "images"))


def test_encode_image_tree(image_tree, tiny_vae, tmp_path):
    out = str(tmp_path / "lat.pt")
    p = run(
        "encode_latents.py",
        "--images",
        image_tree,
        "--vae",
        tiny_vae,
        "--size",
        32,
        "--out",
        out,
        *"--batch_size 4 --max_bad 0.2 --decode_check 4".split(),
    )
    warnings_ = [line for line in p.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings_) == 1 and "dog/broken.jpg" in warnings_[0]
    assert "1 skipped as unreadable" in p.stdout and "cat 6, dog 6, wild 6" in p.stdout
    d = load_pt(out)
    assert set(d) == {
        "latents",
        "labels",
        "domains",
        "paths",
        "vae",
        "subfolder",
        "scaling_factor",
        "image_size",
        "mode",
    }
    assert d["latents"].shape == (18, 4, 4, 4) and d["latents"].dtype == torch.float16
    assert d["labels"].dtype == torch.int64 and d["labels"].tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert d["domains"] == ["cat", "dog", "wild"]
    assert d["paths"][:6] == [
        "cat/0.png",
        "cat/1.JPG",
        "cat/2.webp",
        "cat/3.bmp",
        "cat/4.png",
        "cat/sub/deep.png",
    ]
    assert "dog/broken.jpg" not in d["paths"] and not any(
        x.endswith((".txt", ".DS_Store")) for x in d["paths"]
    )
    meta = (d["vae"], d["subfolder"], d["scaling_factor"], d["image_size"], d["mode"])
    assert meta == (tiny_vae, None, 0.18215, 32, "mean")
    assert not os.path.exists(out + ".parts")  # progress is removed once the file is whole
    # the latents are the VAE's own, unscaled: re-encoding one image here gives the same numbers
    from diffusers import AutoencoderKL

    import encode_latents as enc

    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    x = (
        enc.to_square(Image.open(os.path.join(image_tree, "wild", "0.png")), 32).float()[None]
        / 127.5
        - 1
    )
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(d["latents"][12:13].float(), ref, rtol=2e-3, atol=2e-3)
    # the decode check: originals above reconstructions, 4 of each, and the PSNR
    assert "PSNR" in p.stdout
    assert Image.open(str(tmp_path / "lat_check.png")).size == (2 + 4 * 34, 2 + 2 * 34)


def test_encode_preprocessing_resizes_shorter_side_and_center_crops():
    import encode_latents as enc

    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 30:50] = 255  # a white band in the middle of a wide image
    x = enc.to_square(Image.fromarray(arr), 20)  # 80x40 -> 40x20 -> the middle 20 columns: 5..15
    assert x.shape == (3, 20, 20) and x.dtype == torch.uint8
    assert x[:, :, 7:13].float().mean() > 250 and x[:, :, :3].float().mean() < 5
    assert x[:, :, 17:].float().mean() < 5
    g = enc.to_square(Image.fromarray(np.full((8, 8), 100, np.uint8), mode="L"), 16)
    assert g.shape == (3, 16, 16) and (g == 100).all()  # grayscale repeated to 3 channels


def test_encode_zoom_shrinks_into_a_frame_and_enlarges_by_a_centre_crop():
    import encode_latents as enc

    x = -torch.ones(1, 3, 16, 16)
    x[..., 4:12, 4:12] = 1  # a white square, half the side, centred on black
    small, big = enc.zoom(x, 0.5), enc.zoom(x, 2.0)
    assert small.shape == big.shape == x.shape
    white = lambda y: (y[0, 0] > 0).float()  # noqa: E731
    assert white(small).sum() == 16 and white(small)[6:10, 6:10].all()  # 4x4, centred
    assert (small[..., :4, :] == -1).all()  # framed in the border's colour, black
    assert (big > 0).all() and (big[..., 2:14, 2:14] > 0.9).all()  # the square fills the frame
    assert torch.equal(enc.zoom(x, 1.0), x)


def test_encode_mean_is_deterministic_and_sample_draws(image_tree, tiny_vae, tmp_path):
    outs = {}
    for name, extra in (
        ("a", []),
        ("b", []),
        ("s1", ["--mode", "sample"]),
        ("s2", ["--mode", "sample"]),
        ("s3", ["--mode", "sample", "--seed", 5]),
    ):
        outs[name] = str(tmp_path / f"{name}.pt")
        p = call(
            "encode_latents.py",
            "--images",
            image_tree,
            "--vae",
            tiny_vae,
            "--size",
            32,
            "--out",
            outs[name],
            *"--batch_size 4 --max_bad 0.2 --device cpu".split(),
            *extra,
        )
        assert p.returncode == 0, p.stderr
    a, b, s1, s2, s3 = (load_pt(outs[k]) for k in ("a", "b", "s1", "s2", "s3"))
    assert torch.equal(a["latents"], b["latents"])
    assert s1["mode"] == "sample" and torch.equal(s1["latents"], s2["latents"])  # seeded
    assert not torch.equal(s1["latents"], a["latents"]) and not torch.equal(
        s1["latents"], s3["latents"]
    )


def test_encode_idx_source(tmp_path, tiny_vae):
    import train_mnist_gan as mnist

    data = write_tiny_mnist(str(tmp_path / "idx"), n_train=200, n_test=20)
    out = str(tmp_path / "idx.pt")
    run(
        *"encode_latents.py --source idx --images".split(),
        data,
        *"--classes 3,7 --size 32 --vae".split(),
        tiny_vae,
        "--out",
        out,
        "--max_per_domain",
        10,
        "--zoom_views",
        "0.5,2",
    )
    d = load_pt(out)
    labels = mnist.read_idx(os.path.join(data, "train-labels-idx1-ubyte.gz"))
    assert d["domains"] == ["3", "7"] and d["latents"].shape == (20, 4, 4, 4)
    # each image's zoomed encodings: the VAE's latents of the image zoomed by each factor
    assert d["views"].shape == (20, 2, 4, 4, 4) and d["view_zooms"] == [0.5, 2.0]
    import encode_latents as enc

    vae = enc.load_vae(tiny_vae, None, torch.device("cpu"), torch.float32)
    images = mnist.read_idx(os.path.join(data, "train-images-idx3-ubyte.gz"))
    img = enc.to_square(Image.fromarray(images[int(d["paths"][3].split("#")[1])]), 32)
    x = img[None].float() / 127.5 - 1
    for k, f in enumerate((0.5, 2.0)):
        with torch.no_grad():
            want = vae.encode(enc.zoom(x, f)).latent_dist.mean
        torch.testing.assert_close(d["views"][3, k : k + 1].float(), want, rtol=2e-3, atol=2e-3)
    assert not torch.allclose(d["views"][3, 0].float(), d["latents"][3].float(), atol=0.05)
    assert d["labels"].tolist() == [0] * 10 + [1] * 10
    for path, lab in zip(d["paths"], d["labels"].tolist()):  # each path names an image of its class
        name, i = path.split("#")
        assert name == "train-images-idx3-ubyte.gz" and labels[int(i)] == (3, 7)[lab]


def test_encode_resume_after_kill_gives_the_same_file(tmp_path, tiny_vae):
    data = write_tiny_mnist(str(tmp_path / "idx"), n_train=3000, n_test=20)
    args = [
        "--source",
        "idx",
        "--images",
        data,
        "--classes",
        "1,2,3",
        "--size",
        64,
        "--vae",
        tiny_vae,
        "--batch_size",
        8,
        "--shard_size",
        16,
    ]
    straight, killed = str(tmp_path / "straight.pt"), str(tmp_path / "killed.pt")
    cmd = [PY, os.path.join(HERE, "encode_latents.py"), *map(str, args), "--out", killed]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while (
        not os.path.exists(os.path.join(killed + ".parts", "shard_00003.pt"))
        and time.time() < deadline
    ):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: a power cut
    proc.wait()
    shards = [f for f in os.listdir(killed + ".parts") if f.startswith("shard_")]
    assert not os.path.exists(killed) and 4 <= len(shards) < 56, shards
    p = call("encode_latents.py", *args, "--out", killed)  # forgot --resume: told what to do
    assert_one_line_error(p, "interrupted encode", "--resume")
    p = call("encode_latents.py", *args, "--out", killed, "--size", 32, "--resume")
    assert_one_line_error(p, "--size 64", "delete")
    p = run("encode_latents.py", *args, "--out", killed, "--resume")
    assert "resuming:" in p.stdout
    call("encode_latents.py", *args, "--out", straight)
    a, b = load_pt(straight), load_pt(killed)
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["labels"], b["labels"])
    assert a["paths"] == b["paths"]


def test_encode_too_many_bad_images_stops(image_tree, tiny_vae, tmp_path):
    p = call(
        "encode_latents.py",
        "--images",
        image_tree,
        "--vae",
        tiny_vae,
        "--size",
        32,
        "--out",
        tmp_path / "x.pt",
    )  # 1 of 19 unreadable: over the default 1%
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert (
        "1 of 19 images could not be read" in last
        and "dog/broken.jpg" in last
        and "--max_bad" in last
    )


def test_encode_bad_input(tmp_path, tiny_vae):
    base = ["--vae", tiny_vae, "--out", tmp_path / "x.pt", "--size", 32]
    p = call("encode_latents.py", "--images", tmp_path / "nope", *base)
    assert_one_line_error(p, "no such folder")
    one = tmp_path / "one"
    os.makedirs(one / "cat")
    Image.new("RGB", (8, 8)).save(one / "cat" / "a.png")
    assert_one_line_error(
        call("encode_latents.py", "--images", one, *base), "1 domain folder(s)", "at least 2"
    )
    os.makedirs(one / "dog")
    open(one / "dog" / "readme.txt", "w").write("x")
    assert_one_line_error(
        call("encode_latents.py", "--images", one, *base), "domain 'dog'", "has no images"
    )
    p = call("encode_latents.py", "--images", one, "--domains", "cat,cow", *base)
    assert_one_line_error(p, "no folder cow")
    data = write_tiny_mnist(str(tmp_path / "idx"), n_train=50, n_test=10)
    p = call("encode_latents.py", "--source", "idx", "--images", data, "--classes", "3,12", *base)
    assert_one_line_error(p, "--classes 12: not among the labels", "0,1,2,3,4,5,6,7,8,9")
    p = call("encode_latents.py", "--source", "idx", "--images", data, *base)
    assert_one_line_error(p, "needs --classes")
    p = call("encode_latents.py", "--images", data, "--size", 30, "--vae", tiny_vae)
    assert_one_line_error(p, "argument --size: must be a positive multiple of 8")
    p = call("encode_latents.py", "--images", data, "--mode", "median")
    assert_one_line_error(p, "argument --mode: invalid choice: 'median'")


def test_encode_vae_that_cannot_be_loaded(image_tree, tmp_path):
    not_a_vae = tmp_path / "empty_folder"
    os.makedirs(not_a_vae)
    p = call(
        "encode_latents.py", "--images", image_tree, "--vae", not_a_vae, "--out", tmp_path / "x.pt"
    )
    assert_one_line_error(p, "cannot load the VAE", "--vae")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a Hub id on a machine without network
    p = run(
        "encode_latents.py",
        "--images",
        image_tree,
        "--out",
        tmp_path / "x.pt",
        env=env,
        check=False,
    )
    line = assert_one_line_error(
        p,
        "cannot load the VAE 'stabilityai/sd-vae-ft-mse'",
        "hf download stabilityai/sd-vae-ft-mse",
        "--vae sd-vae-ft-mse",
    )
    assert "Offline?" in line


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_encode_full_size_sd_vae_throughput_on_gpu(tmp_path):
    # The real SD VAE's shape, randomly initialised, at 256 px in fp16: prints images/s
    from diffusers import AutoencoderKL

    vae_dir = str(tmp_path / "sd_vae")
    AutoencoderKL(**SD_VAE).save_pretrained(vae_dir)
    make_image_tree(str(tmp_path / "imgs"))
    rng = np.random.default_rng(0)
    for d in ("cat", "dog", "wild"):
        for i in range(700):
            arr = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / d / f"r{i}.jpg")
    p = run(
        "encode_latents.py",
        "--images",
        tmp_path / "imgs",
        "--vae",
        vae_dir,
        "--out",
        tmp_path / "x.pt",
        *"--batch_size 64 --max_bad 0.01".split(),
        timeout=600,
    )
    print(p.stdout.strip().splitlines()[-1])
    assert "img/s" in p.stdout and load_pt(str(tmp_path / "x.pt"))["latents"].shape[1:] == (
        4,
        32,
        32,
    )


# -----------------------------------------------------------------------------
# train_latent_stargan.py, on latents that encode_latents.py makes from a tiny IDX set

STARGAN_TINY = (
    "--g_dim 16 --g_blocks 2 --e_dim 8 --d_dim 8 --f_dim 16 --style_dim 8 --latent_dim 4 "
    "--batch_size 8 --epoch_size 32 --n_samples 2 --eval_interval 0 --device cpu"
).split()
STARGAN_KEYS = set(
    "epoch step d_loss g_loss g_adv sty ds cyc id struct stats f_match r1 r2 d_real d_fake ada_rt "
    "ada_p lambda_ds".split()
)
STARGAN_KEYS |= {"imgs_per_sec", "time"}
STARGAN_EVAL = {"acc_ref", "acc_lat", "fd_0", "fd_1", "fd_2", "fd_mean", "div", "cyc_err", *PRDC}
STARGAN_EVAL |= {"content_ref", "content_lat", "style_lat", "style_ref", "style_cov"}
STARGAN_EVAL |= {f"{m}_{d}" for m in PRDC for d in "012"}
STARGAN_EVAL_ONCE = {"clf_acc", "fd_real", "div_real", "style_cov_real"}
STARGAN_EVAL_ONCE |= {f"{m}_real" for m in PRDC}


@pytest.fixture(scope="session")
def tiny_latents(tmp_path_factory, tiny_vae):
    folder = tmp_path_factory.mktemp("tiny_latents")
    data = write_tiny_mnist(str(folder / "idx"), n_train=300, n_test=10)
    out = str(folder / "lat.pt")
    run(
        *"encode_latents.py --source idx --images".split(),
        data,
        *"--classes 0,1,2 --size 32 --vae".split(),
        tiny_vae,
        "--out",
        out,
        "--max_per_domain",
        20,
    )
    return out


def stargan(latents, out_dir, *extra, check=True):
    args = ["--data", latents, "--out_dir", out_dir, *STARGAN_TINY, *map(str, extra)]
    return run("train_latent_stargan.py", *args, check=check)


def stargan_call(latents, out_dir, *extra):
    return call(
        "train_latent_stargan.py", "--data", latents, "--out_dir", out_dir, *STARGAN_TINY, *extra
    )


def test_stargan_trains_and_logs_every_loss(tiny_latents, tmp_path):
    out = str(tmp_path / "s")
    p = stargan(
        tiny_latents,
        out,
        *"--epochs 3 --ds_decay_epochs 2 --r1_interval 2 --log_interval 2".split(),
        *"--w_sty 0.5 --w_cyc 2 --w_struct 0.5 --id_decay_epochs 2 --eval_interval 2".split(),
        *"--w_stats 2 --w_f_match 0.5".split(),
    )
    assert "0, 1, 2: 54 training and 6 held-out latents 4x4x4, 4 steps/epoch" in p.stdout
    progress = [line for line in p.stdout.splitlines() if line.startswith("epoch ")]
    assert len(progress) == 6 and "| this run: 12 steps, about " in progress[0]  # every 2 steps
    assert "this run" not in progress[1] and "+ 2 evaluations (not timed yet)" in progress[1]
    # epoch 3's: the steps left and one evaluation, each as duration() writes it (1m03s on a
    # loaded machine)
    span = r"(\d+h\d\dm|\d+m\d\ds|\d+s)"
    assert re.search(rf"\| eta {span} \+ 1 evaluation \(~{span}\)$", progress[-2]), progress[-2]
    log = load_log(out)
    assert log["script"] == "train_latent_stargan.py"
    for k in (
        "w_adv",
        "w_sty",
        "w_ds",
        "ds_decay_epochs",
        "ds_margin",
        "w_cyc",
        "w_id",
        "id_decay_epochs",
        "w_struct",
        "w_stats",
        "stats_e",
        "stats_max",
        "w_f_match",
        "w_r1",
        "r1_interval",
        "e_flip",
        "e_shift",
        "e_zoom",
        "latent_scale",
        "epoch_size",
        "batch_size",
        "lr",
        "f_lr",
        "betas",
        "weight_decay",
        "ema",
        "seed",
        "compile",
    ):
        assert k in log["config"], k
    recs = log["records"]
    assert [r["epoch"] for r in recs] == [1, 2, 3] and [r["step"] for r in recs] == [4, 8, 12]
    assert [r["lambda_ds"] for r in recs] == [1.0, 0.5, 0.0]  # w_ds, w_ds/2, then 0 from epoch 3
    cfg = log["config"]
    evaluated = {2: STARGAN_EVAL | STARGAN_EVAL_ONCE, 3: STARGAN_EVAL}  # epoch 2, and the end
    for r in recs:
        keys = STARGAN_KEYS | evaluated.get(r["epoch"], set())
        assert set(r) == keys, set(r) ^ keys
        assert all(np.isfinite(v) for v in r.values())
        # g_loss is the weighted sum seed 001 writes; lambda_ds and id's weight (--id_decay_epochs
        # 2: w_id, w_id/2, then 0 from epoch 3) are constant in an epoch, so the means obey it
        id_weight = cfg["w_id"] * {1: 1.0, 2: 0.5, 3: 0.0}[r["epoch"]]
        expect = (
            cfg["w_adv"] * r["g_adv"]
            + cfg["w_sty"] * r["sty"]
            + cfg["w_cyc"] * r["cyc"]
            + id_weight * r["id"]
            + cfg["w_struct"] * r["struct"]
            + cfg["w_stats"] * r["stats"]
            + cfg["w_f_match"] * r["f_match"]
            - r["lambda_ds"] * r["ds"]
        )
        assert r["g_loss"] == pytest.approx(expect, rel=1e-5, abs=1e-6)
        assert r["r1"] > 0 and r["id"] > 0 and r["cyc"] > 0 and r["struct"] > 0 < r["stats"]
        assert r["f_match"] > 0
    for e in (1, 2, 3):
        img = np.asarray(Image.open(os.path.join(out, "samples", f"epoch00{e}.png")).convert("RGB"))
        # the references' row above 2 sources; the source, 3 by reference, 3 by z: 32 px cells
        assert img.shape == (2 + 3 * 34, 2 + 7 * 34, 3)
        assert img.std() > 5 and img[2:34, 2:34].max() == 0  # the top-left corner is black
    for r in recs[1:]:
        assert r["fd_mean"] == pytest.approx(np.mean([r["fd_0"], r["fd_1"], r["fd_2"]]))
    # div_real: div's measure on the held-out real latents of each domain, written out here
    import train_latent_stargan as sg

    d = load_pt(tiny_latents)
    _, val = sg.split_domains(d["labels"], 3, cfg["val_fraction"])
    x = d["latents"].float() * cfg["latent_scale"]
    per_domain = []
    for v in val:
        pairs = [(i, j) for i in range(len(v)) for j in range(i + 1, len(v))]
        per_domain.append(np.mean([(x[v[i]] - x[v[j]]).abs().mean().item() for i, j in pairs]))
    assert recs[1]["div_real"] == pytest.approx(np.mean(per_domain), rel=1e-5)
    assert len([f for f in os.listdir(out) if f.startswith("classifier_")]) == 1
    ck = load_pt(os.path.join(out, "ckpt.pt"))
    names = {
        "G",
        "E",
        "F",
        "D",
        "G_ema",
        "E_ema",
        "F_ema",
        "opt_G",
        "opt_D",
        "scaler_G",
        "scaler_D",
    }
    assert names | {"rng_cpu"} <= set(ck) and ck["step"] == 12 and ck["epoch"] == 4


def test_stargan_stats_trains_g_and_leaves_e_unless_stats_e(tiny_latents, tmp_path):
    # stats alone has weight, no weight decay: E moves only by stats' gradient, which reaches it
    # with --stats_e alone (E's style held otherwise), and --stats_max's extremes never reach it.
    # A network that never moved equals its EMA.
    alone = "--w_adv 0 --w_sty 0 --w_ds 0 --w_cyc 0 --w_id 0 --weight_decay 0 --w_stats 1"
    moved = []
    for i, flags in enumerate(([], ["--stats_e"], ["--stats_max"])):
        out = str(tmp_path / f"s{i}")
        p = stargan_call(tiny_latents, out, "--epochs", 1, *alone.split(), *flags)
        assert p.returncode == 0, p.stderr
        ck = load_pt(os.path.join(out, "ckpt.pt"))
        ema = {k: ck[k + "_ema"] for k in "GE"}
        moved.append(
            {k: max(float((v - ema[k][n]).abs().max()) for n, v in ck[k].items()) for k in ema}
        )
        assert load_log(out)["records"][-1]["stats"] > 0
    assert moved[0]["E"] == 0 < moved[0]["G"]
    assert moved[1]["E"] > 0 < moved[1]["G"]
    assert moved[2]["E"] == 0 < moved[2]["G"]
    # --stats_e --stats_max: E's first step is --stats_e's, G's is not. Adam's first step is
    # lr * grad / (|grad| + eps), about lr * sign(grad) (lr 1e-4): the extremes, G's alone, only
    # scale E's gradient (within a quarter of a step where a gradient is near eps); had they
    # reached E, its steps would turn
    one_step = []
    for i, flags in enumerate((["--stats_e"], ["--stats_e", "--stats_max"])):
        out = str(tmp_path / f"one{i}")
        p = stargan_call(tiny_latents, out, "--max_iters", 1, *alone.split(), *flags)
        assert p.returncode == 0, p.stderr
        one_step.append(load_pt(os.path.join(out, "ckpt.pt")))
    plain, with_max = one_step
    for n, v in plain["E"].items():
        torch.testing.assert_close(with_max["E"][n], v, rtol=0, atol=2.5e-5)
    assert any(not torch.equal(with_max["G"][n], v) for n, v in plain["G"].items())


def test_stargan_e_views_give_e_the_zoomed_encodings_of_its_latents():
    import train_latent_stargan as sg

    N, Z, B = 12, 3, 64
    latents = torch.randn(N, 4, 2, 2)
    views = (100 * torch.arange(N)[:, None] + torch.arange(Z)[None]).half()  # row i, zoom k
    views = views[:, :, None, None, None].expand(N, Z, 4, 2, 2)
    labels = torch.arange(N) % 2
    train_sorted = torch.cat([torch.nonzero(labels == d).flatten() for d in (0, 1)])
    counts = torch.tensor([6, 6])
    pool = (latents, labels, train_sorted, counts, counts.cumsum(0) - counts, views)
    cfg = dict(batch_size=B, latent_dim=8, latent_scale=0.5, w_f_match=0, e_flip=0, e_shift=0)
    for p in (1.0, 0.5):
        torch.manual_seed(0)
        batch = sg.draw_batch({**cfg, "e_views": p, "e_zoom": 0.25}, pool, slice(None), None)
        (e_in, theta), x_ref, content = batch[6], batch[3], batch[0]
        assert theta is None  # with the views, no latent zoom (nor flip, nor shift here)
        seen = torch.cat([x_ref, content])
        from_view = (e_in != seen).flatten(1).any(1)
        code = e_in[from_view, 0, 0, 0] / 0.5  # scaled as the latents are
        row, k = (code // 100).long(), code % 100
        assert (k < Z).all() and torch.equal(latents[row], seen[from_view])  # the same latent's
        share = from_view.float().mean().item()
        assert share == 1.0 if p == 1.0 else 0.3 < share < 0.7


def test_stargan_adversarial_losses_and_r2(tiny_latents, tmp_path):
    for loss in ("nsgan", "rpgan"):
        out = str(tmp_path / loss)
        flags = ["--adv_loss", loss, "--w_r2", 1, "--r1_interval", 2, "--epochs", 1, "--no-decode"]
        p = stargan_call(tiny_latents, out, *flags)
        assert p.returncode == 0, p.stderr
        (r,) = load_log(out)["records"]
        assert load_log(out)["config"]["adv_loss"] == loss
        # R1 and R2 on steps 0 and 2 of 4: half the steps, the raw penalties averaged with zeros
        assert r["r1"] > 0 and r["r2"] > 0 and all(np.isfinite(v) for v in r.values())
    p = call("train_latent_stargan.py", "--resume", "--out_dir", out, "--adv_loss", "hinge")
    assert_one_line_error(p, "--adv_loss hinge differs from the checkpoint's rpgan")
    recs = load_log(str(tmp_path / "nsgan"))["records"]
    out = str(tmp_path / "none")
    stargan_call(tiny_latents, out, "--epochs", 1, "--no-decode", "--r1_interval", 2)
    assert load_log(out)["records"][0]["r2"] == 0.0 and recs[0]["d_loss"] > 0


def test_mnist_gan_r2_alone_and_a_gamma_schedule(tiny_mnist, tmp_path):
    out = str(tmp_path / "r2")
    flags = ["--loss", "hinge", "--r2", 4, "--gamma_end", 0.5, "--epochs", 2]
    p = call("train_mnist_gan.py", *mnist_args(tiny_mnist, out, *flags))
    assert p.returncode == 0, p.stderr
    log = load_log(out)
    assert (log["config"]["r1"], log["config"]["r2"], log["config"]["gamma_end"]) == (0.0, 4.0, 0.5)
    assert all("r1" not in r and r["r2"] > 0 for r in log["records"])


def test_stargan_r1_is_zero_off_interval_and_id_when_unweighted(tiny_latents, tmp_path):
    out = str(tmp_path / "s")
    p = stargan_call(
        tiny_latents, out, "--epochs", 2, "--r1_interval", 100, "--w_id", 0, "--no-decode"
    )
    assert p.returncode == 0, p.stderr
    recs = load_log(out)["records"]
    # R1 runs at step 0 only (step % 100 == 0): epoch 1 averages one R1 value with 3 zeros
    assert recs[0]["r1"] > 0 and recs[1]["r1"] == 0.0
    assert all(r["id"] == 0.0 for r in recs)


def test_stargan_profile(tiny_latents, tmp_path):
    out = str(tmp_path / "p")
    p = stargan(tiny_latents, out, "--epochs", 4, "--profile", 3, "--no-decode")
    check_profile(p, out, 3, 16)
    p = stargan_call(tiny_latents, out, "--epochs", 3, "--profile", 3)
    assert_one_line_error(p, "--profile 3", "at least 13 steps")


def test_stargan_resume_is_exact(tiny_latents, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    extra = ["--ds_decay_epochs", 2, "--r1_interval", 3, "--eval_interval", 1]  # evaluation may
    stargan(tiny_latents, a, "--epochs", 3, *extra)  # not move training's RNG
    stargan(tiny_latents, b, "--epochs", 1, *extra)
    p = run("train_latent_stargan.py", "--resume", "--out_dir", b, "--epochs", 3)
    assert "resumed from" in p.stdout
    keys = [
        "epoch",
        "step",
        "d_loss",
        "g_loss",
        "g_adv",
        "sty",
        "ds",
        "cyc",
        "id",
        "r1",
        "lambda_ds",
        "fd_mean",
        "acc_lat",
        "div",
    ]
    ra, rb = load_log(a)["records"], load_log(b)["records"]
    np.testing.assert_allclose(
        [[r[k] for k in keys] for r in rb], [[r[k] for k in keys] for r in ra], rtol=1e-5, atol=1e-6
    )
    ka, kb = (load_pt(os.path.join(d, "ckpt.pt")) for d in (a, b))
    for net in ("G", "D", "G_ema", "F"):
        for k in ka[net]:
            torch.testing.assert_close(kb[net][k], ka[net][k], rtol=1e-5, atol=1e-6)


def test_stargan_ada(tiny_latents, tmp_path):
    base = ["--epochs", 3, "--r1_interval", 2, "--no-decode"]

    def same_logs(a, b, exact=True):
        ra, rb = load_log(a)["records"], load_log(b)["records"]
        assert len(ra) == len(rb)
        for x, y in zip(ra, rb):
            for k in set(x) - {"time", "imgs_per_sec"}:
                assert y[k] == (x[k] if exact else pytest.approx(x[k], rel=1e-5)), (k, x, y)

    # p = 0 computes what the run without ADA computes, bit for bit (its draws come from its own
    # generator); with R1, and with R1 + R2 under rpgan
    for loss in ([], ["--adv_loss", "rpgan", "--w_r2", 1]):
        a, b = str(tmp_path / f"off{len(loss)}"), str(tmp_path / f"p0{len(loss)}")
        for out, p0 in ((a, []), (b, ["--ada_p", 0])):
            p = stargan_call(tiny_latents, out, *base, *loss, *p0)
            assert p.returncode == 0, p.stderr[-2000:]
        same_logs(a, b)
        ka, kb = (load_pt(os.path.join(d, "ckpt.pt")) for d in (a, b))
        assert all(torch.equal(ka["G"][k], kb["G"][k]) for k in ka["G"])
        assert kb["ada"]["p"] == 0.0 and ka["ada"] is None
    # adaptive: p moves (a target near this D's r_t, a fast kimg); every record has ada_p and
    # ada_rt; resume continues p, r_t's sum and the pipe's generator exactly
    ada = ["--ada_target", -0.6, "--ada_kimg", 0.1, "--r1_interval", 3]
    a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
    stargan(tiny_latents, a, *base, *ada)
    stargan(tiny_latents, b, *base[:1], 1, *base[2:], *ada)
    run("train_latent_stargan.py", "--resume", "--out_dir", b, "--epochs", 3)
    same_logs(a, b)
    recs = load_log(a)["records"]
    assert all(0 <= r["ada_p"] <= 1 and -1 <= r["ada_rt"] <= 1 for r in recs)
    assert len({r["ada_p"] for r in recs}) > 1, recs
    p = stargan_call(tiny_latents, str(tmp_path / "x"), "--ada_target", 0.6, "--ada_p", 0.2)
    assert_one_line_error(p, "--ada_target adapts p and --ada_p fixes it: give one of them")


def test_stargan_ada_raises_p_where_d_memorises(tiny_latents, tmp_path):
    # Latents drawn around one mean a domain: 2 a domain, which D learns by heart (r_t =
    # E[sign(D(x_ref))] goes to 1, p with it, until the augmentation stops the memorising), and
    # 2,000 a domain, where r_t rises only early, while D beats a new G, and p falls back to 0.
    # p over the second half of 30 epochs (120 steps of 8); measured 0.8 and 0.08, alike on 1
    # and 2 threads. The ceiling lifted (--ada_p_max 1), so that plot_losses's leak warning shows
    d, gen, n = load_pt(tiny_latents), torch.Generator().manual_seed(0), 2000
    labels = torch.arange(3).repeat_interleave(n)
    lat = torch.randn(3 * n, 4, 4, 4, generator=gen) + 0.5 * labels.view(-1, 1, 1, 1)
    few = torch.cat([torch.arange(2) + k * n for k in range(3)])
    flags = "--epochs 30 --val_fraction 0 --no-decode --d_dim 32 --lr 1e-3 --latent_scale 0.18215"
    late = {}
    for name, keep in (("small", few), ("large", torch.arange(3 * n))):
        data, out = str(tmp_path / f"{name}.pt"), str(tmp_path / name)
        paths = [f"{i}.png" for i in keep.tolist()]
        torch.save({**d, "latents": lat[keep].half(), "labels": labels[keep], "paths": paths}, data)
        ada = ["--ada_target", 0.6, "--ada_kimg", 0.3, "--ada_p_max", 1]
        p = stargan_call(data, out, *flags.split(), *ada)
        assert p.returncode == 0, p.stderr[-2000:]
        late[name] = np.mean([r["ada_p"] for r in load_log(out)["records"][15:]])
    assert late["small"] > 0.5 and late["large"] < 0.2, late
    p = run("plot_losses.py", str(tmp_path / "small" / "log.json"), "--diagnose")
    assert "the augmentation may leak: ada_p reached" in p.stdout


def test_stargan_ada_keeps_the_latent_path_where_d_memorises(posed_shoes, tmp_path):
    # 20 training latents a domain of the posed shoes (20 more held out): D learns them by heart
    # at once, r_t stays near 1 and p rises at full speed. Without a ceiling p ran to 1 and stayed
    # there, the pipe leaked into G, and the latent path left its domain: acc_lat 0.54 against
    # 0.93 without ADA (seed 0; docs/ada.md). p now stops at --ada_p_max (0.4).
    lat, _, scale = posed_shoes
    d, gen = load_pt(lat), torch.Generator().manual_seed(0)
    keep = torch.cat(
        [torch.nonzero(d["labels"] == k).flatten()[torch.randperm(2000, generator=gen)[:40]]
         for k in range(3)]
    )  # fmt: skip
    small = str(tmp_path / "small.pt")
    part = {"latents": d["latents"][keep], "labels": d["labels"][keep]}
    torch.save({**d, **part, "paths": [d["paths"][i] for i in keep.tolist()]}, small)
    flags = (
        "--g_dim 64 --e_dim 32 --d_dim 32 --f_dim 128 --batch_size 16 --epoch_size 1024 "
        "--epochs 4 --ds_decay_epochs 2 --val_fraction 0.5 --eval_interval 4 --no-decode "
        f"--device cpu --latent_scale {scale}"
    ).split()
    out = str(tmp_path / "ada")
    ada = ["--ada_target", "0.6", "--ada_kimg", "0.5"]
    run("train_latent_stargan.py", "--data", small, "--out_dir", out, *flags, *ada)
    recs = load_log(out)["records"]
    p = [r["ada_p"] for r in recs]
    assert p[0] == pytest.approx(0.4) and max(p) <= 0.4 + 1e-6, p  # up at once, to the ceiling
    # the latent path stays in its domain: acc_lat 0.87 on one thread, 0.79 on two; without ADA
    # 0.93 and 0.96; with p left to run to 1, 0.54. The bar: without ADA's, less 0.25
    assert recs[-1]["acc_lat"] >= 0.68, recs[-1]


def test_stargan_resume_refuses_what_it_cannot_continue(tiny_latents, tmp_path):
    out = str(tmp_path / "s")
    stargan_call(tiny_latents, out, "--epochs", 1, "--no-decode")
    for flag, value, old in (("batch_size", 4, 8), ("epoch_size", 64, 32), ("g_dim", 32, 16)):
        p = call("train_latent_stargan.py", "--resume", "--out_dir", out, f"--{flag}", value)
        assert_one_line_error(
            p, f"--{flag} {value} differs from the checkpoint's {old}", f"--{flag} {old}"
        )


def test_stargan_without_a_vae_saves_latent_mosaics(tiny_latents, tmp_path):
    d = load_pt(tiny_latents)
    d["vae"] = str(tmp_path / "gone")  # the VAE the file names is not here
    moved = str(tmp_path / "moved.pt")
    torch.save(d, moved)
    out = str(tmp_path / "s")
    p = stargan_call(moved, out, "--epochs", 1, "--latent_scale", 0.13025)
    notes = [line for line in p.stdout.splitlines() if line.startswith("samples:")]
    assert (
        len(notes) == 1 and "cannot load the VAE" in notes[0] and "2x2 grayscale mosaic" in notes[0]
    )
    img = Image.open(os.path.join(out, "samples", "epoch001.png"))  # 8x8 mosaics, scaled 16x
    assert img.mode == "L" and img.size == ((2 + 7 * 10) * 16, (2 + 3 * 10) * 16)
    assert "warning: --latent_scale 0.13025 differs from the scaling_factor 0.18215" in p.stderr


def test_stargan_bad_input(tiny_latents, tmp_path):
    def bad(d, name):
        path = str(tmp_path / name)
        torch.save(d, path)
        return path

    good = load_pt(tiny_latents)
    one = {**good, "labels": torch.zeros_like(good["labels"]), "domains": ["0"]}
    cases = [
        (str(tmp_path / "missing.pt"), ["no such file", "encode_latents.py"]),
        (
            bad({"weights": torch.zeros(3)}, "foreign.pt"),
            ["not a latents file of encode_latents.py"],
        ),
        (bad(one, "one.pt"), ["1 domain", "at least 2"]),
        (
            bad({**good, "latents": good["latents"].flatten(2)}, "rank.pt"),
            ["expected (N, C, H, W)"],
        ),
        (bad({**good, "views": good["latents"]}, "views.pt"), ["expected (N, Z, C, H, W)"]),
    ]
    open(tmp_path / "junk.pt", "wb").write(b"junk")
    cases.append((str(tmp_path / "junk.pt"), ["cannot be loaded"]))
    for path, needles in cases:
        assert_one_line_error(stargan_call(path, str(tmp_path / "o"), "--epochs", 1), *needles)
    for flags, needle in (
        (["--val_fraction", 0, "--eval_interval", 1], "evaluation needs held-out"),
        (["--g_blocks", 3], "--g_blocks must be even"),
        (["--g_down", 2], "--g_down must be at most g_blocks/2 = 1, got 2"),
        (["--epoch_size", 4], "counts samples"),
        (["--w_ds", -1], "argument --w_ds: must be zero or positive, got -1"),
        (["--r1_interval", 0], "argument --r1_interval: must be at least 1"),
        (["--betas", 0.5], "argument --betas: expected 2 arguments"),
        (["--e_views", 0.5], "--e_views needs latents encoded with --zoom_views"),
        (["--stats_max"], "shape stats, which is off: give it a weight (--w_stats 20)"),
    ):
        assert_one_line_error(stargan_call(tiny_latents, str(tmp_path / "o"), *flags), needle)


def test_stargan_g_down_default_keeps_an_8x8_bottleneck():
    import train_latent_stargan as sg

    # StarGAN v2's one halving (32x32 latents -> 16x16), none where it would leave 4x4: through a
    # 4x4 bottleneck G lost the source's pose (docs/pose.md)
    for size, n in ((4, 0), (8, 0), (16, 1), (32, 1), (64, 1)):
        assert sg.g_down({"g_down": None, "g_blocks": 6}, size) == n
    assert sg.g_down({"g_down": 3, "g_blocks": 6}, 8) == 3  # a flag is taken as given


def test_stargan_resume_on_other_data_is_refused(tiny_latents, tmp_path):
    out = str(tmp_path / "s")
    stargan_call(tiny_latents, out, "--epochs", 1, "--no-decode")
    d = load_pt(tiny_latents)
    keep = d["labels"] < 2  # two of the three domains: the per-domain heads no longer fit
    two = str(tmp_path / "two.pt")
    torch.save(
        {
            **d,
            "latents": d["latents"][keep],
            "labels": d["labels"][keep],
            "domains": d["domains"][:2],
        },
        two,
    )
    p = call("train_latent_stargan.py", "--resume", "--out_dir", out, "--data", two)
    assert_one_line_error(p, "does not fit this run", "new --out_dir")


def test_stargan_nan_names_the_step_and_the_loss(tiny_latents, tmp_path):
    out = str(tmp_path / "s")
    stargan_call(tiny_latents, out, "--epochs", 1, "--no-decode")
    p = run(
        "train_latent_stargan.py",
        "--resume",
        "--out_dir",
        out,
        *"--epochs 3 --lr 1e+30".split(),
        check=False,
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert (
        "non-finite" in last
        and "at step" in last
        and "last good checkpoint" in last
        and "(step 4)" in last
    )
    assert load_pt(os.path.join(out, "ckpt.pt"))["step"] == 4


def test_stargan_compiled_bf16_path_on_cpu(tiny_latents, tmp_path, monkeypatch):
    # The CUDA configuration (torch.compile of G, E, F and D, bf16 autocast, R1 through the raw D)
    # in-process on the CPU. The aot_eager backend traces and differentiates the same graphs as on
    # a GPU; only the code generation, which takes minutes on a CPU, is left out.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    out = str(tmp_path / "c")
    p = stargan_call(
        tiny_latents,
        out,
        *"--epochs 2 --r1_interval 2 --compile --dtype bfloat16 --no-decode".split(),
    )
    assert p.returncode == 0, p.stderr
    recs = load_log(out)["records"]
    assert len(recs) == 2 and recs[0]["r1"] > 0
    assert all(np.isfinite(r["g_loss"]) and np.isfinite(r["d_loss"]) for r in recs)
    assert load_log(out)["config"]["compile"] is True
    assert not any(k.startswith("_orig_mod") for k in load_pt(os.path.join(out, "ckpt.pt"))["G"])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_stargan_on_gpu(tiny_latents, tmp_path):
    out = str(tmp_path / "gpu")
    p = run(
        "train_latent_stargan.py",
        "--data",
        tiny_latents,
        "--out_dir",
        out,
        *STARGAN_TINY[:-2],
        *"--epochs 2 --device cuda --r1_interval 2".split(),
        timeout=900,
    )
    assert "bfloat16 compiled" in p.stdout
    assert all(np.isfinite(r["d_loss"]) and r["r1"] > 0 for r in load_log(out)["records"])


# -----------------------------------------------------------------------------
# --translate: a user's own images through a trained run


@pytest.fixture(scope="session")
def translation_run(tmp_path_factory, tiny_vae):
    """(image folder, run folder): a tiny run trained on the latents of a cat/dog/wild tree."""
    root = tmp_path_factory.mktemp("translate")
    images = make_image_tree(str(root / "images"))
    os.remove(os.path.join(images, "dog", "broken.jpg"))
    lat, out = str(root / "lat.pt"), str(root / "run")
    call("encode_latents.py", "--images", images, "--vae", tiny_vae, "--size", 32, "--out", lat)
    p = call(
        "train_latent_stargan.py",
        "--data",
        lat,
        "--out_dir",
        out,
        *STARGAN_TINY,
        *"--val_fraction 0.1 --epochs 1 --no-decode".split(),
    )
    assert p.returncode == 0, p.stderr
    return images, out


def png(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_translate_by_reference(translation_run, tmp_path):
    images, run_dir = translation_run
    out = str(tmp_path / "ref")
    p = run(
        "train_latent_stargan.py",
        "--translate",
        os.path.join(images, "cat"),
        "--out_dir",
        run_dir,
        "--ref",
        images,
        "--result_dir",
        out,
    )
    assert "translated 6 images x 18 references" in p.stdout
    files = sorted(os.listdir(out))
    assert len(files) == 6 * 18 + 1 and "grid.png" in files
    assert "sub_deep__wild_sub_deep.png" in files and "0__dog_1.png" in files
    assert png(os.path.join(out, "0__dog_1.png")).shape == (32, 32, 3)  # the training image size
    # grid.png: the references along the top, then each source and its translations, at most
    # 16 references across (GRID_COLS): the other 2 have their PNGs only
    assert "grid.png with the first 6 x 16" in p.stdout
    grid = png(os.path.join(out, "grid.png"))
    assert grid.shape == (2 + 7 * 34, 2 + 17 * 34, 3)
    first = grid[2 + 34 : 2 + 34 + 32, 2 + 34 : 2 + 34 + 32]  # source 1's by reference 1
    assert np.array_equal(first, png(os.path.join(out, "0__cat_0.png")))
    # the pipeline, written out here: preprocess as encode_latents.py, the VAE's mean, times the
    # run's latent_scale, the EMA nets' G(x, E(ref, y)), divided back, decoded
    import encode_latents as enc
    import train_latent_stargan as sg

    ckpt = load_pt(os.path.join(run_dir, "ckpt.pt"))
    cfg = ckpt["config"]
    (G, E, _), meta = sg.run_networks(cfg, ckpt, torch.device("cpu"))
    vae = sg.load_vae(meta["vae"], None, torch.device("cpu"), torch.float32)
    x, ref = (
        enc.to_square(Image.open(os.path.join(images, f)), 32) for f in ("cat/0.png", "dog/1.JPG")
    )
    with torch.no_grad():
        lat = [
            vae.encode(t[None].float() / 127.5 - 1).latent_dist.mean * cfg["latent_scale"]
            for t in (x, ref)
        ]
        fake = G(lat[0], E(lat[1], torch.tensor([1])))
        img = vae.decode(fake / cfg["latent_scale"]).sample.clamp(-1, 1)[0]
    expect = ((img + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert np.abs(png(os.path.join(out, "0__dog_1.png")) - expect).max() <= 1


def test_translate_into_a_target_domain(translation_run, tmp_path):
    images, run_dir = translation_run
    args = ["--translate", images, "--out_dir", run_dir, "--target", "wild", "--n_styles", 3]
    a, b, c = (str(tmp_path / d) for d in "abc")
    p = run("train_latent_stargan.py", *args, "--result_dir", a)
    assert "translated 18 images x 3 styles" in p.stdout
    call("train_latent_stargan.py", *args, "--result_dir", b)
    call("train_latent_stargan.py", *args, "--result_dir", c, "--seed", 5)
    files = sorted(os.listdir(a))
    assert len(files) == 18 * 3 + 1 and "cat_sub_deep__wild_style2.png" in files
    # 18 sources: grid.png holds the first 16 (GRID_ROWS), every PNG is written
    assert "grid.png with the first 16 x 3" in p.stdout
    assert png(os.path.join(a, "grid.png")).shape == (2 + 16 * 34, 2 + 4 * 34, 3)
    same = [np.array_equal(png(os.path.join(a, f)), png(os.path.join(b, f))) for f in files]
    other = [np.array_equal(png(os.path.join(a, f)), png(os.path.join(c, f))) for f in files]
    assert all(same) and not any(other[:-1])  # the styles are F's of fixed z: --seed picks them


def test_translate_mistakes(translation_run, tmp_path):
    images, run_dir = translation_run
    empty = tmp_path / "empty"
    os.makedirs(empty / "horse")
    cases = [
        (
            ["--translate", images, "--out_dir", tmp_path, "--target", "wild"],
            ["--translate: no checkpoint at"],
        ),
        (
            ["--translate", tmp_path / "nope", "--out_dir", run_dir, "--target", "wild"],
            ["no such folder"],
        ),
        (["--translate", empty, "--out_dir", run_dir, "--target", "wild"], ["no images"]),
        (
            ["--translate", images, "--out_dir", run_dir, "--target", "horse"],
            ["--target horse: not a domain of the run", "cat, dog, wild"],
        ),
        (
            ["--translate", images, "--out_dir", run_dir, "--ref", empty],
            ["has domain folder horse", "the run knows cat, dog, wild"],
        ),
        (
            ["--translate", images, "--out_dir", run_dir],
            ["either --ref REF_DIR", "or --target DOMAIN"],
        ),
        (
            ["--translate", images, "--out_dir", run_dir, "--target", "wild", "--vae", empty],
            ["cannot load the VAE", "save_pretrained"],
        ),
    ]
    for args, needles in cases:
        assert_one_line_error(call("train_latent_stargan.py", *args), *needles)


# -----------------------------------------------------------------------------
# torchrun: 2 gloo processes on the CPU compute what 1 process computes at the same global batch

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun gives each process on a CPU


def torchrun(script, *args, check=True):
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.join(HERE, script), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    if check and p.returncode != 0:
        raise AssertionError(
            f"torchrun {script} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def test_stargan_on_two_processes_logs_what_one_process_logs(tiny_latents, tmp_path):
    # Tolerance: the ranks' gradients are averaged in another order than one process sums them,
    # which moves float32 results by about its epsilon (1e-7) per step; measured here: 3e-7
    # over these 12 steps. rtol 1e-5 leaves room for that and for nothing else.
    a, b = str(tmp_path / "one"), str(tmp_path / "two")
    flags = [
        *STARGAN_TINY,
        "--data",
        tiny_latents,
        "--r1_interval",
        2,
        "--eval_interval",
        1,
        "--no-decode",
        *("--ada_target", -0.6, "--ada_kimg", 0.1),  # with ADA: its draws and p, shared
        *("--w_f_match", 0.5, "--f_lr", 1e-3),  # f_match: its draws shared, whole on each rank
    ]
    run("train_latent_stargan.py", *flags, "--epochs", 3, "--out_dir", a, env=ONE_THREAD)
    with_classifier(
        b, [os.path.join(a, f) for f in os.listdir(a) if f.startswith("classifier_")][0]
    )
    p = torchrun("train_latent_stargan.py", *flags, "--epochs", 2, "--out_dir", b)
    assert p.stdout.count("done: 8 steps") == 1  # rank 0 alone reports, and writes
    assert load_log(b)["config"]["world_size"] == 2
    # the 2-process run goes on in 1 process: the same log as the straight 1-process run
    p = run("train_latent_stargan.py", "--resume", "--out_dir", b, "--epochs", 3, env=ONE_THREAD)
    assert "resume: --world_size" not in p.stdout and load_log(b)["config"]["world_size"] == 1
    ra, rb = load_log(a)["records"], load_log(b)["records"]
    assert [r["step"] for r in rb] == [4, 8, 12] and "div" in rb[0]
    assert len({r["ada_p"] for r in ra}) > 1  # p moved
    for x, y in zip(ra, rb):
        for k, v in x.items():
            if k not in ("time", "imgs_per_sec"):  # the style measures take differences of
                rel = 1e-4 if k.startswith("style_") else 1e-5  # translations: 10x the noise
                assert y[k] == pytest.approx(v, rel=rel, abs=1e-7), (x["epoch"], k)
    # the EMA generators compute the same translations (weights may differ where a gradient is 0
    # in exact arithmetic, as a conv's bias before instance norm: Adam turns float noise there
    # into steps of size lr, which the norm then removes)
    import train_latent_stargan as sg

    nets = []
    for d in (a, b):
        ckpt = load_pt(os.path.join(d, "ckpt.pt"))
        nets.append(sg.run_networks(ckpt["config"], ckpt, torch.device("cpu"))[0])
    x, z = torch.randn(6, 4, 4, 4), torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        outs = [G(x, F_(z, y)) for G, _, F_ in nets]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_torchrun_refuses_a_batch_the_processes_cannot_share(tiny_latents, tmp_path):
    p = torchrun(
        "train_latent_stargan.py",
        "--data",
        tiny_latents,
        "--out_dir",
        tmp_path,
        *STARGAN_TINY,
        "--batch_size",
        7,
        check=False,
    )
    line = "error: --batch_size 7 is the global batch and 2 processes cannot share it evenly"
    assert (
        p.returncode != 0 and p.stderr.count(line) == 1
    )  # once, from rank 0 (torchrun adds its report)


def test_mnist_gan_refuses_torchrun(tmp_path):
    # as torchrun starts rank 0 of 2; the trainer stops before it touches data or out_dir
    env = {**ONE_THREAD, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    p = run("train_mnist_gan.py", "--out_dir", tmp_path / "o", check=False, env=env)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "train_mnist_gan.py: error: it runs in one process only (seed 004's whole schedule fits "
        "one GPU): start it with python, not torchrun"
    ]
    assert not os.path.exists(tmp_path / "o")


def test_encode_on_two_processes_writes_the_one_process_file(tmp_path, tiny_vae):
    data = write_tiny_mnist(str(tmp_path / "idx"), n_train=400, n_test=20)
    args = [
        "--source",
        "idx",
        "--images",
        data,
        "--classes",
        "1,2,3",
        "--size",
        32,
        "--vae",
        tiny_vae,
        "--batch_size",
        4,
        "--shard_size",
        8,
    ]
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    run("encode_latents.py", *args, "--out", one, env=ONE_THREAD)
    p = torchrun("encode_latents.py", *args, "--out", two)
    assert p.stdout.count("wrote ") == 1 and not os.path.exists(two + ".parts")
    a, b = load_pt(one), load_pt(two)
    assert a["paths"] == b["paths"] and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["latents"], b["latents"])  # bitwise: the same batches, the same threads
    assert {k: v for k, v in a.items() if not torch.is_tensor(v)} == {
        k: v for k, v in b.items() if not torch.is_tensor(v)
    }


# -----------------------------------------------------------------------------
# the StarGAN's evaluation discriminates: stand-in networks whose figures are known


def separable_latents(path, n=60, K=3, seed=0):
    """K domains of 4x4x4 latents, each a Gaussian around its own mean: a classifier tells them
    apart at once."""
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(K, 4, 4, 4, generator=g)
    labels = torch.arange(K).repeat_interleave(n)
    latents = means[labels] + torch.randn(K * n, 4, 4, 4, generator=g)
    domains = [f"d{k}" for k in range(K)]
    torch.save(
        {
            "latents": latents.half(),
            "labels": labels,
            "domains": domains,
            "vae": None,
            "scaling_factor": 1.0,
        },
        path,
    )
    return path


def stargan_evaluator(path, out_dir):
    import train_latent_stargan as sg

    meta = sg.load_latents(path)
    latents, labels = meta["latents"].float(), meta["labels"].long()
    K = len(meta["domains"])
    train_idx, val_idx = (torch.cat(t) for t in sg.split_domains(meta["labels"], K, 0.2))
    cfg = dict(
        out_dir=str(out_dir), seed=0, latent_dim=4, n_div=4, val_fraction=0.2, min_clf_acc=0.8
    )
    ev = sg.TranslationEvaluator(
        cfg, meta, latents, labels, train_idx, val_idx, contextlib.nullcontext()
    )
    return ev, latents, labels, val_idx, K


class Stand:
    """Stand-in E and F: the style is the target domain, one-hot, and (for F) z after it."""

    def __init__(self, K):
        self.K = K

    def E(self, x, y):
        return torch.nn.functional.one_hot(y, self.K).float()

    def F(self, z, y):
        return torch.cat([torch.nn.functional.one_hot(y, self.K).float(), z], 1)


def test_stargan_evaluation_discriminates(tmp_path):
    ev, latents, labels, val_idx, K = stargan_evaluator(
        separable_latents(str(tmp_path / "l.pt")), tmp_path
    )
    ev.setup()
    assert ev.reference["clf_acc"] == 1.0
    s = Stand(K)
    # identity G: every translation stays in its source domain
    ident = ev(lambda x, st: x, s.E, s.F, 1)
    assert ident["acc_ref"] == 0.0 and ident["acc_lat"] == 0.0 and ident["cyc_err"] == 0.0
    assert ident["div"] == 0.0  # and it ignores z
    # G that returns a held-out real latent of the target domain, chosen by z: as good as real
    held = [val_idx[labels[val_idx] == k] for k in range(K)]

    def oracle(x, st):
        k = st[:, :K].argmax(1)
        pick = (
            (st[:, K:].sum(1).abs() * 1e4).long()
            if st.shape[1] > K
            else torch.zeros(len(x), dtype=torch.long)
        )
        return torch.stack(
            [latents[held[t][i % len(held[t])]] for t, i in zip(k.tolist(), pick.tolist())]
        )

    real = ev(oracle, s.E, s.F, 1)
    assert real["acc_ref"] == 1.0 and real["acc_lat"] == 1.0
    assert real["fd_mean"] < 3 * ev.reference["fd_real"] + 0.5 and real["div"] > 0.5
    # G that ignores z: the target domain's mean latent, whatever the style's z. Its translations
    # into a domain are one point: fd = |features(mean) - real mean|^2 + tr(real covariance)
    means = torch.stack([latents[labels == k].mean(0) for k in range(K)])
    mean_g = ev(lambda x, st: means[st[:, :K].argmax(1)], s.E, s.F, 1)
    assert mean_g["div"] == 0.0 and mean_g["acc_lat"] == 1.0
    import train_latent_stargan as sg

    for k in range(K):
        f, _ = sg.embed(ev.clf, means[k : k + 1])
        mu, cov = ev.real[k]
        expect = ((f[0] - mu) ** 2).sum() + np.trace(cov)
        assert mean_g[f"fd_d{k}"] == pytest.approx(expect, rel=1e-6)
    assert mean_g["fd_mean"] > 3 * real["fd_mean"]


def test_stargan_style_measures_see_one_look_and_read_real_data_as_real(tmp_path):
    # style_lat and style_ref: how far two z, or two references, move a translation's style
    # statistics, over how far apart two real latents of the domain are; style_cov: coverage
    ev, latents, labels, val_idx, K = stargan_evaluator(
        separable_latents(str(tmp_path / "l.pt"), n=200), tmp_path
    )
    s, held = Stand(K), [val_idx[labels[val_idx] == k] for k in range(K)]
    gen = torch.Generator().manual_seed(1)

    def one_look(x, st):  # one latent per target domain, whatever the z or the reference
        return torch.stack([latents[held[t][0]] for t in st[:, :K].argmax(1).tolist()])

    def real(x, st):  # a fresh random held-out latent of the target domain, at every call
        pick = [
            h[torch.randint(len(h), (), generator=gen)]
            for h in (held[t] for t in st[:, :K].argmax(1))
        ]
        return latents[torch.stack(pick)]

    floor, as_real = ev(one_look, s.E, s.F, 1), ev(real, s.E, s.F, 1)
    assert floor["style_lat"] == 0.0 and floor["style_ref"] == 0.0
    assert floor["style_cov"] < 0.25 * ev.reference["style_cov_real"]
    assert as_real["style_lat"] == pytest.approx(1.0, abs=0.15)
    assert as_real["style_ref"] == pytest.approx(1.0, abs=0.15)
    # (drawn with replacement, some fakes repeat: a little under real data's coverage)
    assert (
        0.75 * ev.reference["style_cov_real"]
        < as_real["style_cov"]
        < 1.1 * ev.reference["style_cov_real"]
    )
    # G that hands on its reference (by z: a latent drawn from z): the style follows it entirely
    proj = torch.randn(4, latents[0].numel(), generator=gen)
    copier = ev(lambda x, st: st.view_as(x), lambda x, y: x.flatten(1), lambda z, y: z @ proj, 1)
    assert copier["style_ref"] == pytest.approx(1.0)


def test_stargan_content_tells_a_translator_from_a_copier(tmp_path):
    ev, latents, labels, val_idx, K = stargan_evaluator(
        separable_latents(str(tmp_path / "l.pt")), tmp_path
    )
    # E hands G the reference itself; F draws a latent-sized style from z alone
    proj = torch.randn(4, latents[0].numel(), generator=torch.Generator().manual_seed(0))

    def E(x, y):
        return x.flatten(1)

    def F(z, y):
        return z @ proj

    def copier(x, s):  # returns the reference (by z: a latent drawn from z): the source is lost
        return s.view_as(x)

    ident = ev(lambda x, s: x, E, F, 1)
    keeps = ev(lambda x, s: 2 * x.flip(-1) + 1, E, F, 1)  # ignores the style, keeps the source
    lost = ev(copier, E, F, 1)
    half = ev(lambda x, s: x + copier(x, s), E, F, 1)  # the source, and the reference as much
    for path in ("content_ref", "content_lat"):
        assert ident[path] == pytest.approx(1.0) and keeps[path] == pytest.approx(1.0)
        assert lost[path] == pytest.approx(0.0, abs=1e-9)
        assert lost[path] < half[path] < ident[path], half
    assert 0.2 < half["content_ref"] < 0.8  # references differ about as much as the sources do


# -----------------------------------------------------------------------------
# plot_losses.py, on logs the tests write in each trainer's shape


def stargan_log(n=12, **over):
    """A log in train_latent_stargan.py's shape: a calm hinge run; over[key] replaces a curve."""
    e = np.arange(1, n + 1)
    curves = {
        "d_loss": 1.9 - 0.03 * e,
        "g_loss": 2.0 - 0.05 * e,
        "g_adv": 0.4 + 0.02 * e,
        "sty": 0.3 - 0.01 * e,
        "ds": 0.2 + 0.001 * e,
        "cyc": 0.5 - 0.02 * e,
        "id": 0.3 - 0.01 * e,
        "r1": 0.002 + 0 * e,
        "lambda_ds": np.clip(1 - (e - 1) / 20, 0, 1),
        "d_real": 0.3 + 0.02 * e,
        "d_fake": -0.3 - 0.02 * e,
        "imgs_per_sec": 900 + 0 * e,
        "time": 10.0 * e,
    }
    curves.update(over)
    cfg = {
        "w_adv": 1,
        "w_sty": 1,
        "w_ds": 1,
        "w_cyc": 1,
        "w_id": 1,
        "w_r1": 2,
        "r1_interval": 16,
        "ds_decay_epochs": 20,
        "epoch_size": 6144,
        "batch_size": 64,
    }
    recs = [
        {"epoch": int(i), "step": int(96 * i), **{k: float(v[i - 1]) for k, v in curves.items()}}
        for i in e
    ]
    return {"script": "train_latent_stargan.py", "config": cfg, "records": recs}


def mnist_log(n=12, loss="bce", **over):
    """A log.json in train_mnist_gan.py's shape (evaluation figures every 3 epochs): healthy."""
    e = np.arange(1, n + 1)
    curves = {
        "d_loss": 0.62 + 0.005 * np.cos(e),
        "g_loss": 0.9 + 0.01 * np.sin(e),
        "d_real": 0.6 + 0 * e,
        "d_fake": 0.42 + 0 * e,
        "imgs_per_sec": 5000 + 0 * e,
        "time": 12.0 * e,
    }
    curves.update(over)
    recs = [
        {"epoch": int(i), "step": int(937 * i), **{k: float(v[i - 1]) for k, v in curves.items()}}
        for i in e
    ]
    for i, r in enumerate(recs):
        if (i + 1) % 3 == 0:
            r.update(fd=40.0 / (i + 1), kid=2.0 / (i + 1), **{"is": 6.0}, modes=10, kl_uniform=0.02)
    recs[2].update(clf_acc=0.88, fd_real=0.3, kid_real=0.0, is_real=7.3)
    cfg = {"loss": loss, "lr": 2e-4, "lr_d": 2e-4, "n_critic": 1, "r1": 0.0}
    return {"script": "train_mnist_gan.py", "config": cfg, "records": recs}


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def check_picture(path, min_size=(800, 500)):
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert img.shape[1] >= min_size[0] and img.shape[0] >= min_size[1], img.shape
    assert (img < 128).mean() > 0.01 and img.std() > 20  # curves, axes and text on white
    return img


def test_plot_losses_draws_both_trainers_logs(tmp_path):
    sg = write_json(tmp_path / "sg.json", stargan_log(id=np.zeros(12)))  # w_id 0: id constant 0
    p = run("plot_losses.py", sg)
    out = tmp_path / "losses.png"  # default: beside the first log
    assert f"wrote {out}" in p.stdout
    check_picture(out)
    mn = write_json(tmp_path / "mn.json", mnist_log())
    call("plot_losses.py", mn, "--out", tmp_path / "m.png", "--smooth", 3, "--x", "step")
    check_picture(tmp_path / "m.png")
    for ext in ("svg", "pdf"):  # the format follows the extension
        call("plot_losses.py", mn, "--out", tmp_path / f"m.{ext}")
    assert open(tmp_path / "m.svg").read(200).lstrip().startswith("<?xml")
    assert open(tmp_path / "m.pdf", "rb").read(4) == b"%PDF"


def test_plot_losses_panel_order_and_reference_lines():
    import plot_losses as pl

    log = stargan_log(id=np.zeros(12))
    meta, records = {"script": log["script"], "config": log["config"]}, log["records"]
    keys = pl.curve_keys([(meta, records)])
    assert keys[:9] == ["d_loss", "g_loss", "g_adv", "sty", "ds", "cyc", "id", "r1", "lambda_ds"]
    assert keys[-1] == "imgs_per_sec" and keys[9:11] == ["d_real", "d_fake"]
    assert pl.reference_lines(meta, "d_loss", records) == [(2.0, "hinge: logits near 0")]
    assert (
        pl.lambda_zero_x(meta, records, "epoch") == 21.0
        and pl.lambda_zero_x(meta, records, "step") == 21 * 96
    )
    m = mnist_log()
    mm = {"script": m["script"], "config": m["config"]}
    assert pl.reference_lines(mm, "d_loss", m["records"])[0][0] == pytest.approx(np.log(2))
    assert pl.reference_lines(mm, "g_loss", m["records"])[0][0] == pytest.approx(np.log(2))
    assert pl.reference_lines(mm, "fd", m["records"]) == [(0.3, "real data")]
    mm["config"]["loss"] = "minimax"
    assert pl.reference_lines(mm, "g_loss", m["records"])[0][0] == pytest.approx(-np.log(2))


def test_plot_losses_decides_from_the_log_not_the_file_name(tmp_path):
    # a forked, renamed trainer writes its own script name: reference lines and diagnosis remain
    import plot_losses as pl

    for log, kind in ((stargan_log(), "hinge"), (mnist_log(loss="minimax"), "minimax")):
        log["script"] = "my_fork.py"
        meta = {"script": log["script"], "config": log["config"]}
        assert pl.loss_kind(meta, log["records"]) == kind
    e = np.arange(12.0)
    log = stargan_log(d_loss=2.0 + 2 * 16 * 0.002 + 0.01 * np.sin(e))
    log["script"] = "my_fork.py"
    assert "D stopped learning" in diagnosis(tmp_path, log)
    bare = stargan_log()["records"]  # no config at all: the keys say it is a translation run
    assert pl.loss_kind({"config": {}}, bare) == "hinge"


def test_plot_losses_overlays_runs_and_reads_other_formats(tmp_path):
    os.makedirs(tmp_path / "a")
    a = write_json(tmp_path / "a" / "log.json", mnist_log())
    b = write_json(tmp_path / "b.json", mnist_log(loss="minimax")["records"])  # a bare list
    lines = [json.dumps(r) for r in mnist_log(n=6)["records"]]
    c = tmp_path / "c.jsonl"
    c.write_text("\n".join(lines) + "\n" + lines[0][:25])  # JSON Lines, the last line being written
    p = call("plot_losses.py", a, b, str(c), "--out", tmp_path / "o.png", "--diagnose")
    assert "skipping the truncated last line 7" in p.stderr
    assert "[a]" in p.stdout and "[tmp" not in p.stdout  # labels: folder names
    check_picture(tmp_path / "o.png")
    p = call(
        "plot_losses.py",
        a,
        b,
        "--labels",
        "bce,minimax",
        "--out",
        tmp_path / "o2.png",
        "--diagnose",
    )
    assert "[bce]" in p.stdout and "[minimax]" in p.stdout
    gap = mnist_log()
    del gap["records"][4]["g_loss"]  # a missing key leaves a gap, nothing more
    assert (
        call(
            "plot_losses.py", write_json(tmp_path / "gap.json", gap), "--out", tmp_path / "g.png"
        ).returncode
        == 0
    )
    assert_one_line_error(
        call("plot_losses.py", a, "--labels", "x,y"), "--labels names 2 runs, 1 logs"
    )


def test_plot_losses_reads_a_log_while_a_trainer_replaces_it(tmp_path, monkeypatch):
    # Deterministic: the trainer's own atomic write is interrupted half-way through its JSON, and
    # the reader, at that moment, finds the previous log whole; after it, the new one.
    import plot_losses as pl
    import train_mnist_gan as mnist

    path = str(tmp_path / "log.json")
    old, new = mnist_log(n=3), mnist_log(n=4)
    mnist.save_json_atomic(old, path)
    seen = []
    real_dump = json.dump

    def dump_and_read_midway(obj, f, **kw):
        text = json.dumps(obj, **kw)
        f.write(text[: len(text) // 2])
        f.flush()  # half of the new log is on disk, in the temporary file
        seen.append(len(pl.read_log(path)[1]))
        f.write(text[len(text) // 2 :])

    monkeypatch.setattr(json, "dump", dump_and_read_midway)
    mnist.save_json_atomic(new, path)
    monkeypatch.setattr(json, "dump", real_dump)
    assert seen == [3] and len(pl.read_log(path)[1]) == 4
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temporary file is left


def diagnosis(tmp_path, log, *flags):
    path = write_json(tmp_path / f"d{len(os.listdir(tmp_path))}.json", log)
    p = call("plot_losses.py", path, "--diagnose", "--no_plot", "--labels", "run", *flags)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_diagnose_healthy_runs_have_no_findings_but_r1(tmp_path):
    assert "no findings" in diagnosis(tmp_path, mnist_log())
    out = diagnosis(tmp_path, stargan_log())
    assert out.count("\n") == 1 and "r1 averages" in out  # r1's effective share is always said


def test_diagnose_divergence(tmp_path):
    g = 0.9 + 0 * np.arange(12.0)
    g[6] = float("nan")
    assert "g_loss is nan at epoch 7" in diagnosis(tmp_path, mnist_log(g_loss=g))
    d = 0.6 + 0 * np.arange(12.0)
    d[9:] = [50.0, 500.0, 5000.0]
    out = diagnosis(tmp_path, mnist_log(d_loss=d))
    assert "d_loss reaches 50 at epoch 10" in out and "diverging" in out
    assert "diverg" not in diagnosis(tmp_path, mnist_log(d_loss=0.6 + 0.5 * np.arange(12.0) / 12))


def test_diagnose_d_dominates(tmp_path):
    e = np.arange(12.0)
    out = diagnosis(tmp_path, mnist_log(d_loss=0.6 * np.exp(-e / 2), g_loss=1 + 0.5 * e))
    assert "D dominates" in out and "balance 0.693" in out
    assert "g_loss climbed from 1.750 to 5.750" in out  # the means of the first and last 4 epochs
    out = diagnosis(tmp_path, stargan_log(d_loss=1.9 * np.exp(-e / 2), g_adv=0.3 + 0.3 * e))
    assert "D dominates" in out and "g_adv climbed" in out
    assert "D dominates" not in diagnosis(
        tmp_path, mnist_log(d_loss=0.6 * np.exp(-e / 2), g_loss=1 - 0.01 * e)
    )
    assert "D dominates" not in diagnosis(tmp_path, mnist_log(loss="wgan", d_loss=-e, g_loss=e))


def test_diagnose_d_stopped_learning(tmp_path):
    e = np.arange(12.0)
    pinned = 2.0 + 2 * 16 * 0.002 + 0.01 * np.sin(e)  # hinge 2 plus R1's share
    out = diagnosis(tmp_path, stargan_log(d_loss=pinned))
    assert (
        "D stopped learning" in out
        and "hinge part of d_loss" in out
        and "for 12 epochs from epoch 1" in out
    )
    out = diagnosis(tmp_path, mnist_log(d_real=0.5 + 0.01 * np.sin(e), d_fake=0.49 + 0 * e))
    assert "D(x) and D(G(z)) both stay within 0.05 of 1/2" in out
    assert "stopped" not in diagnosis(tmp_path, stargan_log(d_loss=1.9 - 0.05 * e))
    assert "stopped" not in diagnosis(tmp_path, stargan_log(d_loss=2.0 + 0.3 * np.sin(e * 1.3)))
    out = diagnosis(tmp_path, stargan_log(d_loss=2.0 + 0.2 * np.sin(e)), "--pinned_tol", 0.3)
    assert "stopped" in out  # thresholds are flags
    late = 1.6 + 0 * e
    late[5:] = 2.0  # pinned from epoch 6 on, for 7 epochs
    assert "for 7 epochs from epoch 6" in diagnosis(tmp_path, stargan_log(d_loss=late, r1=0 * e))


def test_diagnose_diversity(tmp_path):
    e = np.arange(1, 13.0)
    lam = np.clip(1 - (e - 1) / 5, 0, 1)
    assert "lambda_ds is 0 from epoch 6 on" in diagnosis(tmp_path, stargan_log(lambda_ds=lam))
    assert "lambda_ds is 0" not in diagnosis(tmp_path, stargan_log())
    out = diagnosis(tmp_path, stargan_log(ds=0.3 * np.exp(-e / 2)))  # lambda_ds ~0.5 at epoch 12
    assert (
        "diversity is collapsing while it is still rewarded: ds fell from 0.1820 (epoch 1) to "
        "0.0007 (epoch 12)"
    ) in out
    assert "collapsing" not in diagnosis(tmp_path, stargan_log(ds=0.3 - 0.005 * e))


def test_diagnose_r1_effective_contribution(tmp_path):
    out = diagnosis(
        tmp_path, stargan_log(r1=0.003 + 0 * np.arange(12.0), d_loss=1.5 + 0 * np.arange(12.0))
    )
    assert (
        "r1 averages 0.003 over the last 4 epochs (the raw penalty, 0 on 15 of every 16 steps)"
        in out
    )
    assert (
        "w_r1 * r1_interval = 2 * 16 x 0.003 = 0.096 to d_loss on average, 6.4% of d_loss 1.500"
        in out
    )
    assert "r1 averages" not in diagnosis(tmp_path, stargan_log(r1=np.zeros(12)))
    log = mnist_log(r1=0.01 + 0 * np.arange(12.0))
    log["config"]["r1"] = 10.0  # --r1 GAMMA: GAMMA/2 on every step
    assert "GAMMA/2 = 5 x 0.01 = 0.05 to d_loss" in diagnosis(tmp_path, log)


def test_diagnose_oscillation(tmp_path):
    e = np.arange(24.0)
    out = diagnosis(tmp_path, mnist_log(n=24, g_loss=1.2 + 0.4 * np.sin(2 * np.pi * e / 6)))
    assert "g_loss swings with a period of about 6 epochs and an amplitude of 0.39" in out
    assert "swings" not in diagnosis(tmp_path, mnist_log(n=24, g_loss=1.2 + 0.02 * e))
    assert "swings" not in diagnosis(
        tmp_path, mnist_log(n=24, g_loss=1.2 + 0.01 * np.sin(2 * np.pi * e / 6))
    )


def test_diagnose_mode_collapse_from_the_evaluation(tmp_path):
    log = mnist_log()
    log["records"][-1].update(modes=3, kl_uniform=1.2)
    out = diagnosis(tmp_path, log)
    assert "mode collapse: the samples cover 3 of 10 classes at epoch 12 (kl_uniform 1.2, fd" in out
    assert "collapse" not in diagnosis(tmp_path, mnist_log())
    # coverage: few real images have a sample near them, though every class is there
    log = mnist_log()
    log["records"][2].update(coverage_real=0.9)
    log["records"][-1].update(coverage=0.3)
    out = diagnosis(tmp_path, log)
    assert "mode collapse: coverage is 0.300 against real data's 0.900 at epoch 12" in out
    log["records"][-1].update(coverage=0.6)
    assert "collapse" not in diagnosis(tmp_path, log)
    assert "collapse" in diagnosis(tmp_path, log, "--low_coverage", 0.7)  # a flag
    log = stargan_log()
    for i, r in enumerate(log["records"]):
        r["div"] = [0.2, 0.25, 0.1, 0.03][i // 3] if i % 3 == 2 else None
    assert "diversity collapse: div fell from 0.25 (epoch 6) to 0.03 (epoch 12)" in diagnosis(
        tmp_path, log
    )


def test_diagnose_a_generator_that_ignores_its_source(tmp_path):
    log = stargan_log()
    for i, r in enumerate(log["records"]):  # evaluated every 4 epochs; the last one counts
        if i % 4 == 3:
            r.update(content_ref=[0.6, 0.5, 0.01][i // 4], content_lat=[0.5, 0.4, 0.3][i // 4])
    out = diagnosis(tmp_path, log)
    assert (
        "G ignores its source by reference: content_ref 0.010, content_lat 0.300 at epoch 12" in out
    )
    log["records"][-1].update(content_ref=0.35)
    assert "ignores its source" not in diagnosis(tmp_path, log)
    assert "ignores its source by reference and by z" in diagnosis(
        tmp_path, log, "--min_content", 0.4
    )
    log["records"][-1].update(content_ref=None, content_lat=None)  # the last evaluation: epoch 8
    assert "ignores its source" not in diagnosis(tmp_path, log)
    assert "content_ref 0.500, content_lat 0.400 at epoch 8" in diagnosis(
        tmp_path, log, "--min_content", 0.45
    )


def test_diagnose_one_look_by_z_or_by_reference(tmp_path):
    import plot_losses as pl

    log = stargan_log()
    for i, r in enumerate(log["records"]):  # evaluated every 4 epochs; the last one counts
        if i % 4 == 3:
            r.update(style_lat=[0.8, 0.4, 0.08][i // 4], style_ref=[0.9, 0.9, 0.7][i // 4])
            r.update(style_cov=[0.5, 0.3, 0.15][i // 4])
    log["records"][3]["style_cov_real"] = 0.6
    out = diagnosis(tmp_path, log)
    assert (
        "one look by z: style_lat 0.080; z does not reach the domain's styles: style_cov 0.150 "
        "against real data's 0.600 at epoch 12 (style_lat 0.080, style_ref 0.700, style_cov 0.150"
    ) in out
    both = diagnosis(tmp_path, log, "--min_style", 0.75)
    assert "one look by z: style_lat 0.080; one look by reference: style_ref 0.700" in both
    log["records"][-1].update(style_lat=0.5)
    out = diagnosis(tmp_path, log)
    assert "one look" not in out and "does not reach" in out
    log["records"][-1].update(style_cov=0.35)
    assert "style_" not in diagnosis(tmp_path, log)
    meta = {"script": log["script"], "config": log["config"]}
    assert pl.reference_lines(meta, "style_cov", log["records"]) == [(0.6, "real data")]
    assert (1.0, "1: as real data") in pl.reference_lines(meta, "style_lat", log["records"])


def test_diagnose_d_overfitting_and_an_augmentation_that_may_leak(tmp_path):
    rt = [0.2, 0.3, 0.5, 0.55, 0.62, 0.7, 0.8, 0.9, 0.4, 0.7, 0.75, 0.8]
    log = stargan_log(ada_rt=np.array(rt), ada_p=np.zeros(12))
    out = diagnosis(tmp_path, log)  # the last 3 records above 0.6, no ADA: it suggests ADA
    assert (
        "D overfits: ada_rt = E[sign(D(x_ref))] stays above 0.6 (from 0.700 at epoch 10 to 0.800 "
        "at epoch 12)" in out
    )
    assert "--ada_target 0.6 augments" in out
    assert "D overfits" not in diagnosis(tmp_path, log, "--overfit_epochs", 4)  # 0.4 at epoch 9
    assert "may leak" not in out
    log["config"]["ada_target"] = 0.6
    log["records"][5]["ada_p"], log["records"][6]["ada_p"] = 0.85, 0.9
    out = diagnosis(tmp_path, log)
    assert "ADA's p has not caught up" in out
    assert "the augmentation may leak: ada_p reached 0.900 at epoch 7 (above 0.8)" in out
    assert "may leak" not in diagnosis(tmp_path, log, "--leak_p", 0.95)


def test_diagnosis_is_a_list_a_user_can_extend(tmp_path, monkeypatch):
    import plot_losses as pl

    def slow(meta, records, th):
        return ["slow run"] if pl.column(records, "imgs_per_sec")[-1] < 1000 else []

    monkeypatch.setattr(pl, "FINDINGS", pl.FINDINGS + [slow])
    log = stargan_log()
    meta = {"script": log["script"], "config": log["config"]}
    th = pl.build_parser().parse_args(["x"])
    assert pl.diagnose(meta, log["records"], th)[-1] == "slow run"
    assert len(pl.FINDINGS) == 14 and all(callable(f) for f in pl.FINDINGS)


def test_plot_losses_annotate_puts_findings_in_the_footer(tmp_path):
    e = np.arange(12.0)
    path = write_json(
        tmp_path / "log.json", mnist_log(d_loss=0.6 * np.exp(-e / 2), g_loss=1 + 0.5 * e)
    )
    call("plot_losses.py", path, "--out", tmp_path / "plain.png")
    call("plot_losses.py", path, "--annotate", "--out", tmp_path / "annotated.png")
    plain, annotated = (
        np.asarray(Image.open(tmp_path / f).convert("L")) for f in ("plain.png", "annotated.png")
    )
    assert annotated.shape[0] > plain.shape[0]  # a taller figure: the footer
    assert (annotated[-40:] < 128).mean() > 0.005  # text at the bottom


def test_plot_losses_bad_input(tmp_path):
    (tmp_path / "empty.json").write_text("")
    cases = [
        (str(tmp_path / "missing.json"), "no such file"),
        (str(tmp_path / "empty.json"), "the file is empty"),
        (write_json(tmp_path / "nolog.json", {"model": "x"}), "no training log"),
        (
            write_json(tmp_path / "text.json", [{"note": "x"}, {"note": "y"}]),
            "no record has a numeric value",
        ),
    ]
    (tmp_path / "junk.json").write_text("{not json\n{also not\nnor this")
    cases.append((str(tmp_path / "junk.json"), "neither JSON nor JSON Lines"))
    for path, needle in cases:
        assert_one_line_error(call("plot_losses.py", path), needle)
    ok = write_json(tmp_path / "ok.json", mnist_log())
    assert_one_line_error(
        call("plot_losses.py", ok, "--out", tmp_path / "x.jpg"), ".png, .svg or .pdf"
    )
    assert_one_line_error(
        call("plot_losses.py", ok, "--smooth", 0), "argument --smooth: must be at least 1"
    )


# -----------------------------------------------------------------------------
# the commands the docstrings and the README say run in seconds: run, on data the test writes


def seconds_commands(name):
    """The `python ...` commands of README.md or a script's docstring whose comment says they run
    in seconds, in order (a line ending in a backslash goes on in the next)."""
    text = open(os.path.join(HERE, name)).read()
    if name.endswith(".py"):
        text = text.split('"""')[1].replace("\\\\", "\\")
    text = re.sub(r"\\\n\s*", " ", text)
    found = re.findall(r"^\s*(python [^#\n]+?)\s+#[^\n]*\bseconds\b", text, re.M)
    return [c.split() for c in found]


@pytest.mark.parametrize("where", ["README.md", "train_mnist_gan.py", "train_latent_stargan.py"])
def test_commands_that_run_in_seconds(where, tmp_path):
    # each command, in order, in a fresh folder where the test writes the data they name:
    # data/fashion (Fashion-MNIST's IDX files, here tiny ones); the rest the commands make
    commands = seconds_commands(where)
    assert commands, f"{where} names no command that runs in seconds"
    write_tiny_mnist(str(tmp_path / "data" / "fashion"))
    for cmd in commands:
        t = time.perf_counter()
        run(cmd[1], *cmd[2:], cwd=tmp_path, timeout=120)
        assert time.perf_counter() - t < 60, cmd  # seconds, not minutes, even on 2 CPU cores


# -----------------------------------------------------------------------------
# the docs: every relative link leads somewhere


def markdown_without_code(path):
    """A markdown file's text with its fenced code blocks and inline code taken out."""
    text = re.sub(r"^```.*?^```", "", open(path).read(), flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(path):
    """The anchors GitHub gives a markdown file's headings: lower case, punctuation dropped, spaces
    to hyphens."""
    heads = re.findall(r"^#{1,6} +(.+?) *$", markdown_without_code(path), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_every_relative_link_in_the_docs_leads_to_a_file_and_heading():
    docs = sorted(f"docs/{f}" for f in os.listdir(os.path.join(HERE, "docs")) if f.endswith(".md"))
    checked = 0
    for name in ["README.md", *docs]:
        path = os.path.join(HERE, name)
        for target in re.findall(r"\]\(([^)\s]+)\)", markdown_without_code(path)):
            if re.match(r"[a-z]+:", target):
                continue  # http://, https://, mailto:
            file, _, anchor = target.partition("#")
            to = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            assert os.path.exists(to), f"{name}: {target} leads to no file"
            if anchor:
                assert anchor in heading_anchors(to), f"{name}: {target}: no such heading"
            checked += 1
    assert checked >= 20, checked  # README.md links to every doc


# -----------------------------------------------------------------------------
# the StarGAN learns to translate: it reaches the target domain, with diverse outputs, and keeps
# each source's pose. Fashion-MNIST has no pose (every garment is centred, every shoe faces
# left), so the test poses it: each image takes one of two poses, drawn at random in every domain
# alike, and its file name says which. Pose and class are judged on images, decoded through the
# VAE, by judges fitted on real images decoded through the same VAE. Its data and run take a
# second process from the first test here on (pose_lane), so these tests come last: by then the
# others have run on the other core.


# Not reached by the recipe in the test's 1,280 steps (docs/style.md). Seed 0: by reference 0.557
# to 0.699 (two machines), by z a gap of 0.245 to 0.263. The style flags (--w_stats 20 --w_f_match 1
# --f_lr 1e-3 --stats_e, E's views zoomed in the image, --stats_max, --lr 3e-4) read 0.864 to 0.903
# by reference on three seeds and two machines, the gaps 0.012 to 0.043, and keep the scale case's
# pose on one machine, not on the other (0.20 to 0.40); at 2,560 steps 0.922 to 0.939, the scale
# pose lost (0.40); at 3,840 steps 0.939, 0.935 and 0.942, the pose held on every case, content
# 0.22 to 0.49. With --e_views 0.85 (not 0.67) the scale pose holds at 1,280 steps (0.972 to
# 0.986) and 2,560 (0.975), by reference 0.887 to 0.900 and 0.909 to 0.929. --lr 5e-4 reads 0.903
# to 0.926 in 1,280 steps on three seeds but loses the scale pose on seed 0 (0.537).
# The test keeps the recipe: the flags need data encoded with the zoomed views, in 1,280 steps
# f_match makes z idle where the style hardly varies (the pose test's div bar), and three times
# the run is about 12 more minutes of suite
STYLE_XFAIL = (  # docs/style.md
    "the recipe: by reference 0.56 to 0.70 of 0.9, by z a gap of 0.25 over 0.2; the style flags "
    "with --stats_max read 0.864 to 0.903 in 1,280 steps (--e_views 0.85 keeps the scale case's "
    "pose; with --lr 5e-4 0.903 to 0.926, the scale pose lost on one seed of three), 0.906 to "
    "0.939 in 2,560 and 0.935 to 0.942 in 3,840"
)


@pytest.fixture(scope="session", autouse=True)
def pose_lane(request, tmp_path_factory):
    """The pose test's data and run (posed_fashion.pose_lane), in a second process on one core
    while the other tests take the other: started with the first test here when any selected test
    needs it. (the process, its folder), or None."""
    needed = any(
        {"posed_shoes", "pose_run"} & set(item.fixturenames) for item in request.session.items
    )
    if not needed or not os.path.isdir(FASHION):
        yield None
        return
    # two lanes of a core each: this process and every script it starts from now on use one
    # thread, as the lane does (on 2 cores two one-thread lanes do more than one of two threads)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    folder = str(tmp_path_factory.mktemp("posed"))
    log = open(os.path.join(folder, "lane.log"), "w")
    proc = subprocess.Popen(
        [PY, "-u", os.path.join(HERE, "posed_fashion.py"), "pose-lane", folder],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    yield proc, folder
    if proc.poll() is None:  # the session ends first (-x, Ctrl-C): the lane and the run it started
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(), log.close()


def lane_file(lane, name, timeout=1500):
    """The lane's data.json or run.json, once it is written; the lane's log if it failed or
    took longer than timeout seconds from here (then it is stopped)."""
    if lane is None:
        pytest.skip("apt-get install dataset-fashion-mnist")
    proc, folder = lane
    path, start = os.path.join(folder, name), time.time()
    while not os.path.exists(path):
        late = time.time() - start > timeout
        if proc.poll() is not None or late:
            if late:
                os.killpg(proc.pid, signal.SIGKILL)
            with open(os.path.join(folder, "lane.log")) as f:
                why = f"no {name} after {timeout} s" if late else "stopped"
                raise AssertionError(f"posed_fashion.py pose-lane {why}:\n{f.read()[-3000:]}")
        time.sleep(0.5)
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def posed_shoes(pose_lane):
    """The posed (and styled) shoes of posed_fashion.POSE_CASE, their VAE and latents, from the
    lane: (latents file, VAE folder, scale)."""
    return lane_file(pose_lane, "data.json")


@pytest.fixture(scope="session")
def pose_run(pose_lane):
    """The lane's run: (its evaluation records, judge_translations of it). The pose and class
    judges are fitted here, once the other tests are done, while the lane's run finishes; the lane
    fits the style judge after its run."""
    lat, vae_dir, _ = lane_file(pose_lane, "data.json")
    judges = pf.fit_judges(lat, vae_dir, ["pose", "class"])
    out = lane_file(pose_lane, "run.json")
    if out["style_judge"]:  # POSE_CASE has a style
        judges["style"] = pf.Judge(2).eval().requires_grad_(False)
        judges["style"].load_state_dict(load_pt(out["style_judge"]))
    return out["evals"], pf.judge_translations(out["run"], lat, vae_dir, judges=judges)


def test_stargan_translates_keeping_the_pose_on_fashion_mnist(pose_run):
    evals, judged = pose_run
    # the evaluation's figures, in the log: the target domain, diversity, content
    first, last = evals[0], evals[-1]
    assert [r["epoch"] for r in evals] == [5, 10, 15, 20]
    assert last["acc_ref"] >= 0.8 and last["acc_lat"] >= 0.8, last  # 0.93 / 0.88 (seed 0)
    assert last["fd_mean"] <= 0.5 * first["fd_mean"], (first["fd_mean"], last["fd_mean"])
    # diverse: one source under different z differs by a real share of what real latents of a
    # domain differ by (the bug this guards against: div 0.001 against div_real 0.72)
    assert last["div"] >= 0.25 * first["div_real"], (last["div"], first["div_real"])
    # judged on decoded images: each translation keeps its source's pose, by reference (where
    # the reference is posed the other way) and by z, and lands in the target domain, by each
    # path alone. Seed 0 (half dimmed): pose by reference 0.986, by z 0.953; class 0.888, 0.877.
    # Without the dimming, seeds 0, 1, 2: pose 0.98, 0.99, 0.99 and 0.98, 0.98, 0.97; class
    # 0.87, 0.84, 0.88 and 0.92, 0.94, 0.88
    assert judged["pose_judge"] >= 0.95 and judged["class_judge"] >= 0.85, judged  # judges work
    assert judged["pose_ref"] >= 0.9 and judged["pose_lat"] >= 0.9, judged
    assert judged["class_ref"] >= 0.8 and judged["class_lat"] >= 0.8, judged
    # and the label-free content measure sees it
    assert last["content_ref"] >= 0.4 and last["content_lat"] >= 0.4, last
    # half of every domain is dim (an independent coin): the style judge works, and the
    # label-free style measures are logged with their real-data level
    assert judged["style_judge"] >= 0.95, judged
    # and reads the translations themselves: those whose reference has the source's brightness
    # (nothing to change) it judges in that brightness (0.845; 0.82 to 0.89 over the docs' dim runs)
    assert judged["style_same"] >= 0.75, judged
    # the reference's reach: two references of one domain in two styles give translations
    # further apart (over the two references' own distance) than two in one style (0.53 against
    # 0.26; the style flags at 3,840 steps 0.74 to 0.78 against 0.49 to 0.55)
    assert judged["ref_reach_other"] > 1.2 * judged["ref_reach_same"] > 0, judged
    assert all(0 <= last[k] for k in ("style_lat", "style_ref", "style_cov")), last
    assert 0 < first["style_cov_real"] <= 1, first


@pytest.mark.xfail(strict=True, reason=STYLE_XFAIL)
def test_stargan_takes_the_style_by_reference_and_by_z_on_fashion_mnist(pose_run):
    # the same run: by reference the output takes the reference's brightness (over the pairs whose
    # reference has the other one), and by z each brightness comes out in its real share
    _, judged = pose_run
    assert judged["style_lat_gap"] <= 0.2, judged
    assert judged["style_ref"] >= 0.9, judged
