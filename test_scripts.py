"""Each script end to end, as a user runs it: a subprocess with tiny flags, on tiny data the tests write.

    python -m pytest -q test_scripts.py

Nothing here touches the network: downloads go to a server on 127.0.0.1 that the test starts, or to a
closed port. GPU-only tests are skipped where there is no CUDA.
"""
import gzip
import hashlib
import http.server
import json
import os
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

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
CUDA = torch.cuda.is_available()
FASHION = "/usr/share/datasets/fashion-mnist"


def run(script, *args, check=True, timeout=300, cwd=None):
    """Run a script of the project; return the CompletedProcess (stdout and stderr as text)."""
    p = subprocess.run([PY, os.path.join(HERE, script), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def assert_one_line_error(p, *needles):
    """A user mistake: non-zero exit, exactly one line on stderr, no traceback, and the line says what to do."""
    assert p.returncode != 0, p.stdout
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def load_log(out_dir):
    with open(os.path.join(out_dir, "log.json")) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# tiny MNIST-format data: class k is a bright bar at a position and angle of its own, plus noise

def write_idx(path, array):
    """array uint8 of rank 1 (labels) or 3 (images) -> an IDX file, gzipped when path ends in .gz."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
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


def write_tiny_mnist(folder, n_train=512, n_test=256, gz=True):
    os.makedirs(folder, exist_ok=True)
    ext = ".gz" if gz else ""
    x, y = make_digits(n_train, 0)
    xt, yt = make_digits(n_test, 1)
    for name, arr in (("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y),
                      ("t10k-images-idx3-ubyte", xt), ("t10k-labels-idx1-ubyte", yt)):
        write_idx(os.path.join(folder, name + ext), arr)
    return folder


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    return write_tiny_mnist(str(tmp_path_factory.mktemp("tiny_mnist")))


def mnist_args(data_dir, out_dir, *extra):
    return ["--data_dir", data_dir, "--out_dir", out_dir, "--batch_size", 32, "--log_interval", 4,
            "--sample_interval", 8, "--device", "cpu", "--seed", 1, "--eval_interval", 0, *extra]


def check_grid(path, size=304):
    """A 5x5 grid of 28px images, 2px padding, scaled 2x: present, the right size, and not blank."""
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert img.shape == (size, size), img.shape
    cells = img[4:60, 4:60]  # the first image, inside the padding
    assert img.std() > 5 and cells.std() > 1, (img.std(), cells.std())


# -----------------------------------------------------------------------------
# train_mnist_gan.py

LOSS_KEYS = {"bce": [], "minimax": [], "wgan": [], "wgan-gp": ["gp"], "hinge": [], "lsgan": []}


@pytest.mark.parametrize("loss", sorted(LOSS_KEYS))
def test_mnist_gan_trains_with_every_loss(tiny_mnist, tmp_path, loss):
    out = str(tmp_path / loss)
    p = run("train_mnist_gan.py", *mnist_args(tiny_mnist, out, "--loss", loss, "--epochs", 2))
    assert "img/s" in p.stdout.splitlines()[-1]
    log = load_log(out)
    assert log["script"] == "train_mnist_gan.py"
    cfg = log["config"]
    assert cfg["loss"] == loss and cfg["batch_size"] == 32 and cfg["epochs"] == 2
    for k in ("lr", "lr_d", "b1", "b2", "n_critic", "optimizer", "clip_value", "lambda_gp", "r1", "seed", "dtype", "compile"):
        assert k in cfg, k
    assert [r["epoch"] for r in log["records"]] == [1, 2]
    assert [r["step"] for r in log["records"]] == [16, 32]  # 512 images // 32 per step
    keys = {"epoch", "step", "d_loss", "g_loss", "d_real", "d_fake", "imgs_per_sec", "time", *LOSS_KEYS[loss]}
    for r in log["records"]:
        assert set(r) == keys, set(r) ^ keys
        assert all(np.isfinite(v) for v in r.values())
    if loss in ("bce", "minimax", "lsgan"):  # D(x), D(G(z)) are probabilities there, raw critic scores elsewhere
        assert all(0 < r["d_real"] < 1 and 0 < r["d_fake"] < 1 for r in log["records"])
    samples = sorted(os.listdir(os.path.join(out, "samples")))
    assert samples == ["000000.png", "000008.png", "000016.png", "000024.png", "000032.png"]
    check_grid(os.path.join(out, "samples", "000032.png"))


def test_mnist_gan_defaults_follow_each_loss(tiny_mnist, tmp_path):
    out = str(tmp_path / "wgan")
    run("train_mnist_gan.py", *mnist_args(tiny_mnist, out, "--loss", "wgan", "--max_iters", 10))
    cfg = load_log(out)["config"]
    assert (cfg["optimizer"], cfg["lr"], cfg["n_critic"], cfg["clip_value"]) == ("rmsprop", 5e-5, 5, 0.01)
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert all(v.abs().max() <= 0.01 + 1e-9 for v in ck["D"].values())  # every D weight clipped
    out = str(tmp_path / "gp")
    run("train_mnist_gan.py", *mnist_args(tiny_mnist, out, "--loss", "wgan-gp", "--max_iters", 2, "--lr", 3e-4))
    cfg = load_log(out)["config"]
    assert (cfg["lr"], cfg["lr_d"], cfg["b1"], cfg["b2"], cfg["lambda_gp"]) == (3e-4, 1e-4, 0.0, 0.9, 10.0)
    p = run("train_mnist_gan.py", "--help")
    assert "wgan-gp: adam lr 0.0001 betas (0, 0.9) n_critic 5" in p.stdout.replace("\n", " ").replace("  ", " ")


def test_mnist_gan_r1_and_n_critic(tiny_mnist, tmp_path):
    out = str(tmp_path / "r1")
    run("train_mnist_gan.py", *mnist_args(tiny_mnist, out, "--loss", "hinge", "--r1", 10, "--n_critic", 2, "--epochs", 1))
    r = load_log(out)["records"][0]
    assert r["r1"] > 0 and np.isfinite(r["r1"])
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    # 16 D steps, G on every second one: Adam's step count says how often each optimizer stepped
    assert ck["opt_D"]["state"][0]["step"].item() == 16 and ck["opt_G"]["state"][0]["step"].item() == 8


def records_losses(log):
    return [[r[k] for k in ("epoch", "step", "d_loss", "g_loss", "d_real", "d_fake")] for r in log["records"]]


def test_mnist_gan_resume_is_exact(tiny_mnist, tmp_path):
    # with an evaluation every epoch: the classifier trained in the middle of run b must not move training's RNG
    a, b, c = str(tmp_path / "straight"), str(tmp_path / "resumed"), str(tmp_path / "midepoch")
    ev = ["--eval_interval", 1, "--eval_samples", 200]
    run("train_mnist_gan.py", *mnist_args(tiny_mnist, a, "--epochs", 3, *ev))
    # b and c find a's classifier in their cache: a trains it, b and c load it, and neither may move the RNG
    cached = [f for f in os.listdir(a) if f.startswith("classifier_")]
    for d in (b, c):
        os.makedirs(d)
        shutil.copy(os.path.join(a, cached[0]), d)
    run("train_mnist_gan.py", *mnist_args(tiny_mnist, b, "--epochs", 1, *ev))
    p = run("train_mnist_gan.py", "--resume", "--out_dir", b, "--epochs", 3)  # other flags from the checkpoint
    assert "resumed from" in p.stdout and "at step 16" in p.stdout
    assert "evaluation classifier: trained" not in p.stdout  # the cached classifier is reused
    assert [r["fd"] for r in load_log(b)["records"]] == pytest.approx([r["fd"] for r in load_log(a)["records"]], rel=1e-6)
    run("train_mnist_gan.py", *mnist_args(tiny_mnist, c, "--epochs", 3, "--max_iters", 5, *ev))  # stops inside epoch 1
    run("train_mnist_gan.py", "--resume", "--out_dir", c, "--max_iters", 0)
    ref = records_losses(load_log(a))
    for other in (b, c):
        np.testing.assert_allclose(records_losses(load_log(other)), ref, rtol=1e-6, atol=1e-7)
        ka = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)
        kb = torch.load(os.path.join(other, "ckpt.pt"), weights_only=True)
        for net in ("G", "D"):
            for k in ka[net]:
                torch.testing.assert_close(kb[net][k], ka[net][k], rtol=1e-6, atol=1e-7)


def test_mnist_gan_ctrl_c_saves_and_resumes(tiny_mnist, tmp_path):
    a, b = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    args = mnist_args(tiny_mnist, b, "--epochs", 40, "--log_interval", 16, "--sample_interval", 10000)
    proc = subprocess.Popen([PY, os.path.join(HERE, "train_mnist_gan.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is under way, then press Ctrl-C
        if line.startswith("epoch 3/"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted at step" in out and "--resume" in out
    stopped = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)["step"]
    assert 48 <= stopped < 640
    run("train_mnist_gan.py", "--resume", "--out_dir", b)
    run("train_mnist_gan.py", *mnist_args(tiny_mnist, a, "--epochs", 40, "--log_interval", 16, "--sample_interval", 10000))
    np.testing.assert_allclose(records_losses(load_log(b)), records_losses(load_log(a)), rtol=1e-6, atol=1e-7)


MNIST_EVAL = {"fd", "kid", "is", "modes", "kl_uniform"}
MNIST_EVAL_ONCE = {"clf_acc", "fd_real", "kid_real", "is_real"}


def test_mnist_gan_evaluation(tiny_mnist, tmp_path):
    out = str(tmp_path / "ev")
    p = run("train_mnist_gan.py", *mnist_args(tiny_mnist, out, "--epochs", 3, "--eval_interval", 2, "--eval_samples", 300))
    assert "evaluation classifier: trained" in p.stdout and "warning" not in p.stderr
    assert p.stdout.count("eval epoch") == 2  # epoch 2, and the end of the run (epoch 3)
    recs = load_log(out)["records"]
    assert MNIST_EVAL | MNIST_EVAL_ONCE <= set(recs[1]) and not (MNIST_EVAL | MNIST_EVAL_ONCE) & set(recs[0])
    assert MNIST_EVAL <= set(recs[2]) and not MNIST_EVAL_ONCE & set(recs[2])  # the reference figures: once
    r = recs[1]
    assert r["clf_acc"] > 0.9  # the tiny set's classes are easy: the figures mean something
    assert r["fd"] > 0 and r["fd_real"] >= 0 and r["fd"] > r["fd_real"]  # an untrained-ish G is far from real data
    assert 1 <= r["is"] <= 10 and 1 <= r["is_real"] <= 10 and 0 <= r["modes"] <= 10 and r["kl_uniform"] >= 0
    assert len([f for f in os.listdir(out) if f.startswith("classifier_")]) == 1


def test_mnist_gan_warns_when_the_classifier_cannot_classify(tmp_path):
    d = write_tiny_mnist(str(tmp_path / "shuffled"), n_train=256, n_test=128)
    rng = np.random.default_rng(0)  # labels that have nothing to do with the images
    for name, n in (("train-labels-idx1-ubyte.gz", 256), ("t10k-labels-idx1-ubyte.gz", 128)):
        write_idx(os.path.join(d, name), rng.integers(0, 10, n).astype(np.uint8))
    p = run("train_mnist_gan.py", *mnist_args(d, str(tmp_path / "o"), "--max_iters", 8, "--eval_interval", 1,
                                              "--eval_samples", 100))
    assert "warning: the evaluation classifier's test accuracy is" in p.stderr and "mean little" in p.stderr


def test_mnist_gan_nan_stops_and_keeps_the_checkpoint(tiny_mnist, tmp_path):
    out = str(tmp_path / "nan")
    run("train_mnist_gan.py", *mnist_args(tiny_mnist, out, "--epochs", 1))
    before = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    p = run("train_mnist_gan.py", "--resume", "--out_dir", out, "--epochs", 3, "--lr", 1e30, "--lr_d", 1e30, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "non-finite" in last and "at step 1" in last and "last good checkpoint" in last and "step 16" in last, last
    after = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert after["step"] == 16
    torch.testing.assert_close(after["G"], before["G"])
    assert [r["step"] for r in load_log(out)["records"]] == [16]


@pytest.mark.parametrize("flags,needle", [
    (["--batch_size", 0], "--batch_size must be at least"),
    (["--batch_size", 1], "BatchNorm needs more than one sample"),
    (["--epochs", 0], "--epochs must be at least 1"),
    (["--lr", -1], "--lr must be positive"),
    (["--b1", 1.5], "--b1 must be in [0, 1)"),
    (["--r1", -2], "--r1 must be zero or positive"),
    (["--batch_size", 100000], "larger than the training set (512 images)"),
    (["--device", "tpu9"], "--device tpu9"),
])
def test_mnist_gan_impossible_flags(tiny_mnist, tmp_path, flags, needle):
    p = run("train_mnist_gan.py", *mnist_args(tiny_mnist, str(tmp_path / "o")), *flags, check=False)
    assert_one_line_error(p, needle)


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_mnist_gan_cuda_requested_without_cuda(tiny_mnist, tmp_path):
    p = run("train_mnist_gan.py", *mnist_args(tiny_mnist, str(tmp_path / "o")), "--device", "cuda", check=False)
    assert_one_line_error(p, "CUDA is not available", "--device cpu")


def test_mnist_gan_resume_errors(tiny_mnist, tmp_path):
    out = tmp_path / "r"
    p = run("train_mnist_gan.py", *mnist_args(tiny_mnist, str(out)), "--resume", check=False)
    assert_one_line_error(p, "no checkpoint at", "start without --resume")
    os.makedirs(out)
    torch.save({"weights": torch.zeros(3)}, out / "ckpt.pt")
    p = run("train_mnist_gan.py", *mnist_args(tiny_mnist, str(out)), "--resume", check=False)
    assert_one_line_error(p, "is not a checkpoint of train_mnist_gan.py")
    (out / "ckpt.pt").write_bytes(b"not a torch file")
    p = run("train_mnist_gan.py", *mnist_args(tiny_mnist, str(out)), "--resume", check=False)
    assert_one_line_error(p, "cannot be loaded")
    run("train_mnist_gan.py", *mnist_args(tiny_mnist, str(out), "--max_iters", 2))
    p = run("train_mnist_gan.py", "--resume", "--out_dir", out, "--loss", "wgan", check=False)
    assert_one_line_error(p, "--loss wgan differs from the checkpoint's bce", "new --out_dir")


def test_mnist_gan_missing_data_offline(tmp_path):
    # port 9 on loopback: nothing listens there, so the download fails at once, as it does offline
    p = run("train_mnist_gan.py", "--data_dir", tmp_path / "empty", "--mirror", "http://127.0.0.1:9/",
            "--out_dir", tmp_path / "o", "--device", "cpu", check=False)
    line = assert_one_line_error(p, "mnist not found in", "download failed", "Put train-images-idx3-ubyte.gz",
                                 "--dataset fashion")
    assert str(tmp_path / "empty") in line


def corrupt_idx_sets(folder):
    """Yield (description, data_dir, expected message) for IDX files broken in the ways downloads break."""
    for case, needle in (("magic", "bad magic number"), ("truncated", "truncated or corrupt"),
                         ("gzip", "cannot be read"), ("halfgzip", "cannot be read"), ("labels", "labels")):
        d = write_tiny_mnist(os.path.join(folder, case), n_train=64, n_test=32)
        path = os.path.join(d, "train-images-idx3-ubyte.gz")
        raw = gzip.decompress(open(path, "rb").read())
        if case == "magic":
            raw = b"\x00\x00\x08\x09" + raw[4:]
        elif case == "truncated":
            raw = raw[:len(raw) // 2]
        if case == "gzip":
            open(path, "wb").write(os.urandom(2000))
        elif case == "halfgzip":
            whole = gzip.compress(raw)
            open(path, "wb").write(whole[:len(whole) // 2])
        elif case == "labels":  # 64 images, 30 labels
            write_idx(os.path.join(d, "train-labels-idx1-ubyte.gz"), np.zeros(30, np.uint8))
        else:
            open(path, "wb").write(gzip.compress(raw))
        yield case, d, needle


def test_mnist_gan_corrupt_idx_files(tmp_path):
    for case, d, needle in corrupt_idx_sets(str(tmp_path)):
        p = run("train_mnist_gan.py", "--data_dir", d, "--out_dir", tmp_path / "o", "--device", "cpu",
                "--mirror", "http://127.0.0.1:9/", check=False)
        assert_one_line_error(p, needle)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = lambda *a, **k: QuietHandler(*a, directory=str(www), **k)  # noqa: E731
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
        mnist.download("t10k-labels-idx1-ubyte.gz", "0" * 32, str(dest), ["http://127.0.0.1:9/", url])
    assert os.listdir(dest) == []
    # the script: a mirror that serves the tiny set, whose MD5s are not MNIST's, is refused in one line
    write_tiny_mnist(str(www), n_train=64, n_test=32)
    p = run("train_mnist_gan.py", "--data_dir", dest, "--mirror", url, "--out_dir", tmp_path / "o", "--device", "cpu", check=False)
    assert_one_line_error(p, "MD5", "expected f68b3c2dcbeaaa9fbdd348bbdeb94873")
    assert os.listdir(dest) == []


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="apt-get install dataset-fashion-mnist")
def test_mnist_gan_finds_debian_fashion_mnist(tmp_path):
    out = str(tmp_path / "f")
    p = run("train_mnist_gan.py", "--dataset", "fashion", "--data_dir", tmp_path / "nothing_here", "--mirror",
            "http://127.0.0.1:9/", "--out_dir", out, "--max_iters", 3, "--eval_interval", 0, "--device", "cpu")
    assert "60000 images, 937 steps/epoch" in p.stdout
    assert load_log(out)["records"][0]["step"] == 3


def test_mnist_gan_uncompressed_idx_and_torchvision_layout(tmp_path):
    d = write_tiny_mnist(str(tmp_path / "data" / "MNIST" / "raw"), n_train=64, n_test=32, gz=False)
    p = run("train_mnist_gan.py", "--data_dir", tmp_path / "data", "--out_dir", tmp_path / "o", "--max_iters", 2,
            "--batch_size", 16, "--device", "cpu", "--mirror", "http://127.0.0.1:9/")
    assert "64 images" in p.stdout and os.path.exists(os.path.join(d, "train-images-idx3-ubyte"))


def test_mnist_gan_compiled_bf16_path_on_cpu(tiny_mnist, tmp_path):
    # The CUDA configuration (torch.compile + bf16 autocast), run on the CPU: the same code path, minus CUDA.
    out = str(tmp_path / "c")
    p = run("train_mnist_gan.py", *mnist_args(tiny_mnist, out, "--compile", "--dtype", "bfloat16", "--max_iters", 12,
                                              "--r1", 1), timeout=600)
    assert "bfloat16 compiled" in p.stdout
    r = load_log(out)["records"][0]
    assert r["step"] == 12 and np.isfinite(r["d_loss"]) and np.isfinite(r["g_loss"])
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in ck["G"])  # the raw module's weights, not the compiled wrapper's


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_mnist_gan_on_gpu(tiny_mnist, tmp_path):
    out = str(tmp_path / "gpu")
    p = run("train_mnist_gan.py", *mnist_args(tiny_mnist, out, "--epochs", 3, "--device", "cuda"), timeout=600)
    assert "bfloat16 compiled" in p.stdout
    assert all(np.isfinite(r["d_loss"]) for r in load_log(out)["records"])


# -----------------------------------------------------------------------------
# encode_latents.py, with a tiny randomly initialised VAE saved and loaded the way a real one is

TINY_VAE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
# Stable Diffusion's VAE (sd-vae-ft-mse), randomly initialised: for the GPU throughput check only
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("tiny_vae"))
    AutoencoderKL(**TINY_VAE).save_pretrained(folder)
    return folder


def make_image_tree(root):
    """cat/dog/wild folders of small images in several formats and shapes, one corrupt file, one non-image."""
    rng = np.random.default_rng(0)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
    for d, (w, h) in (("cat", (40, 32)), ("dog", (32, 48)), ("wild", (64, 64))):
        os.makedirs(os.path.join(root, d, "sub"), exist_ok=True)
        for i, ext in enumerate([".png", ".jpg", ".webp", ".bmp", ".png"]):
            arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            img = Image.fromarray(arr).convert("L") if i == 4 else Image.fromarray(arr)  # one grayscale
            img.save(os.path.join(root, d, f"{i}{ext.upper() if i == 1 else ext}"), fmt[ext])
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, d, "sub", "deep.png"))
    open(os.path.join(root, "dog", "broken.jpg"), "wb").write(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    open(os.path.join(root, "cat", "notes.txt"), "w").write("not an image")
    open(os.path.join(root, "cat", ".DS_Store"), "wb").write(b"\0\0")
    return root


@pytest.fixture
def image_tree(tmp_path):
    return make_image_tree(str(tmp_path / "images"))


def load_pt(path):
    return torch.load(path, weights_only=True)


def test_encode_image_tree(image_tree, tiny_vae, tmp_path):
    out = str(tmp_path / "lat.pt")
    p = run("encode_latents.py", "--images", image_tree, "--vae", tiny_vae, "--size", 32, "--out", out,
            "--batch_size", 4, "--max_bad", 0.2, "--decode_check", 4)
    warnings_ = [l for l in p.stderr.splitlines() if l.startswith("warning")]
    assert len(warnings_) == 1 and "dog/broken.jpg" in warnings_[0]
    assert "1 skipped as unreadable" in p.stdout and "cat 6, dog 6, wild 6" in p.stdout
    d = load_pt(out)
    assert set(d) == {"latents", "labels", "domains", "paths", "vae", "subfolder", "scaling_factor", "image_size", "mode"}
    assert d["latents"].shape == (18, 4, 4, 4) and d["latents"].dtype == torch.float16
    assert d["labels"].dtype == torch.int64 and d["labels"].tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert d["domains"] == ["cat", "dog", "wild"]
    assert d["paths"][:6] == ["cat/0.png", "cat/1.JPG", "cat/2.webp", "cat/3.bmp", "cat/4.png", "cat/sub/deep.png"]
    assert "dog/broken.jpg" not in d["paths"] and not any(x.endswith((".txt", ".DS_Store")) for x in d["paths"])
    assert (d["vae"], d["subfolder"], d["scaling_factor"], d["image_size"], d["mode"]) == (tiny_vae, None, 0.18215, 32, "mean")
    assert torch.isfinite(d["latents"].float()).all() and d["latents"].float().std() > 0
    assert not os.path.exists(out + ".parts")  # progress is removed once the file is whole
    # the latents are the VAE's own, unscaled: re-encoding one image in the test gives the same numbers
    from diffusers import AutoencoderKL
    import encode_latents as enc
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    x = enc.to_square(Image.open(os.path.join(image_tree, "wild", "0.png")), 32).float()[None] / 127.5 - 1
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(d["latents"][12:13].float(), ref, rtol=2e-3, atol=2e-3)
    # the decode check: originals above reconstructions, 4 of each, and the PSNR
    assert "PSNR" in p.stdout
    check = Image.open(str(tmp_path / "lat_check.png"))
    assert check.size == (2 + 4 * 34, 2 + 2 * 34)


def test_encode_preprocessing_resizes_shorter_side_and_center_crops():
    import encode_latents as enc
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 30:50] = 255  # a white band in the middle of a wide image
    x = enc.to_square(Image.fromarray(arr), 20)  # 80x40 -> 40x20 -> the middle 20 columns: the band at 5..15
    assert x.shape == (3, 20, 20) and x.dtype == torch.uint8
    assert x[:, :, 7:13].float().mean() > 250 and x[:, :, :3].float().mean() < 5 and x[:, :, 17:].float().mean() < 5
    g = enc.to_square(Image.fromarray(np.full((8, 8), 100, np.uint8), mode="L"), 16)
    assert g.shape == (3, 16, 16) and (g == 100).all()  # grayscale repeated to 3 channels


def test_encode_mean_is_deterministic_and_sample_draws(image_tree, tiny_vae, tmp_path):
    import encode_latents as enc  # in-process: the same main() the command line runs, without 5 interpreter starts
    outs = {}
    for name, extra in (("a", []), ("b", []), ("s1", ["--mode", "sample"]), ("s2", ["--mode", "sample"]),
                        ("s3", ["--mode", "sample", "--seed", 5])):
        outs[name] = str(tmp_path / f"{name}.pt")
        enc.main(["--images", image_tree, "--vae", tiny_vae, "--size", "32", "--out", outs[name], "--batch_size", "4",
                  "--max_bad", "0.2", "--device", "cpu", *map(str, extra)])
    a, b, s1, s2, s3 = (load_pt(outs[k]) for k in ("a", "b", "s1", "s2", "s3"))
    assert torch.equal(a["latents"], b["latents"])
    assert s1["mode"] == "sample" and torch.equal(s1["latents"], s2["latents"])  # seeded
    assert not torch.equal(s1["latents"], a["latents"]) and not torch.equal(s1["latents"], s3["latents"])


def test_encode_idx_source(tmp_path, tiny_vae):
    data = write_tiny_mnist(str(tmp_path / "idx"), n_train=200, n_test=20)
    out = str(tmp_path / "idx.pt")
    run("encode_latents.py", "--source", "idx", "--images", data, "--classes", "3,7", "--size", 32,
        "--vae", tiny_vae, "--out", out, "--max_per_domain", 10)
    d = load_pt(out)
    labels = read_labels(os.path.join(data, "train-labels-idx1-ubyte.gz"))
    assert d["domains"] == ["3", "7"] and d["latents"].shape == (20, 4, 4, 4)
    assert d["labels"].tolist() == [0] * 10 + [1] * 10
    for path, lab in zip(d["paths"], d["labels"].tolist()):  # each path names an image of the right class
        name, i = path.split("#")
        assert name == "train-images-idx3-ubyte.gz" and labels[int(i)] == (3, 7)[lab]


def read_labels(path):
    import train_mnist_gan
    return train_mnist_gan.read_idx(path)


def test_encode_resume_after_kill_gives_the_same_file(tmp_path, tiny_vae):
    data = write_tiny_mnist(str(tmp_path / "idx"), n_train=3000, n_test=20)
    args = ["--source", "idx", "--images", data, "--classes", "1,2,3", "--size", 64, "--vae", tiny_vae,
            "--batch_size", 8, "--shard_size", 16]
    straight, killed = str(tmp_path / "straight.pt"), str(tmp_path / "killed.pt")
    proc = subprocess.Popen([PY, os.path.join(HERE, "encode_latents.py"), *map(str, args), "--out", killed],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(killed + ".parts", "shard_00003.pt")) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: a power cut
    proc.wait()
    shards = [f for f in os.listdir(killed + ".parts") if f.startswith("shard_")]
    assert not os.path.exists(killed) and 4 <= len(shards) < 56, shards
    p = run("encode_latents.py", *args, "--out", killed, check=False)  # forgot --resume: told what to do
    assert_one_line_error(p, "interrupted encode", "--resume")
    p = run("encode_latents.py", *args, "--out", killed, "--size", 32, "--resume", check=False)
    assert_one_line_error(p, "--size 64", "delete")
    p = run("encode_latents.py", *args, "--out", killed, "--resume")
    assert "resuming:" in p.stdout
    run("encode_latents.py", *args, "--out", straight)
    a, b = load_pt(straight), load_pt(killed)
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["labels"], b["labels"]) and a["paths"] == b["paths"]


def test_encode_too_many_bad_images_stops(image_tree, tiny_vae, tmp_path):
    p = run("encode_latents.py", "--images", image_tree, "--vae", tiny_vae, "--size", 32, "--out", tmp_path / "x.pt",
            check=False)  # 1 of 19 unreadable is over the default 1%
    assert p.returncode != 0 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "1 of 19 images could not be read" in last and "dog/broken.jpg" in last and "--max_bad" in last


def test_encode_bad_input(tmp_path, tiny_vae):
    base = ["--vae", tiny_vae, "--out", tmp_path / "x.pt", "--size", 32]
    p = run("encode_latents.py", "--images", tmp_path / "nope", *base, check=False)
    assert_one_line_error(p, "no such folder")
    one = tmp_path / "one"
    os.makedirs(one / "cat")
    Image.new("RGB", (8, 8)).save(one / "cat" / "a.png")
    p = run("encode_latents.py", "--images", one, *base, check=False)
    assert_one_line_error(p, "1 domain folder(s)", "at least 2")
    os.makedirs(one / "dog")
    open(one / "dog" / "readme.txt", "w").write("x")
    p = run("encode_latents.py", "--images", one, *base, check=False)
    assert_one_line_error(p, "domain 'dog'", "has no images")
    p = run("encode_latents.py", "--images", one, "--domains", "cat,cow", *base, check=False)
    assert_one_line_error(p, "no folder cow")
    data = write_tiny_mnist(str(tmp_path / "idx"), n_train=50, n_test=10)
    p = run("encode_latents.py", "--source", "idx", "--images", data, "--classes", "3,12", *base, check=False)
    assert_one_line_error(p, "--classes 12: not among the labels", "0,1,2,3,4,5,6,7,8,9")
    p = run("encode_latents.py", "--source", "idx", "--images", data, *base, check=False)
    assert_one_line_error(p, "needs --classes")
    p = run("encode_latents.py", "--images", data, "--size", 30, "--vae", tiny_vae, check=False)
    assert_one_line_error(p, "multiple of 8")


def test_encode_vae_that_cannot_be_loaded(image_tree, tmp_path):
    not_a_vae = tmp_path / "empty_folder"
    os.makedirs(not_a_vae)
    p = run("encode_latents.py", "--images", image_tree, "--vae", not_a_vae, "--out", tmp_path / "x.pt", check=False)
    assert_one_line_error(p, "cannot load the VAE", "--vae")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a Hub id on a machine without network
    p = subprocess.run([PY, os.path.join(HERE, "encode_latents.py"), "--images", image_tree, "--out", str(tmp_path / "x.pt")],
                       capture_output=True, text=True, env=env, timeout=120)
    line = assert_one_line_error(p, "cannot load the VAE 'stabilityai/sd-vae-ft-mse'", "hf download stabilityai/sd-vae-ft-mse",
                                 "--vae sd-vae-ft-mse")
    assert "Offline?" in line


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_encode_full_size_sd_vae_throughput_on_gpu(tmp_path):
    # The real SD VAE's shape, randomly initialised, at 256 px in fp16: prints images/s for the record.
    from diffusers import AutoencoderKL
    vae_dir = str(tmp_path / "sd_vae")
    AutoencoderKL(**SD_VAE).save_pretrained(vae_dir)
    make_image_tree(str(tmp_path / "imgs"))
    rng = np.random.default_rng(0)
    for d in ("cat", "dog", "wild"):
        for i in range(700):
            Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(tmp_path / "imgs" / d / f"r{i}.jpg")
    p = run("encode_latents.py", "--images", tmp_path / "imgs", "--vae", vae_dir, "--out", tmp_path / "x.pt",
            "--batch_size", 64, "--max_bad", 0.01, timeout=600)
    print(p.stdout.strip().splitlines()[-1])
    assert "img/s" in p.stdout and load_pt(str(tmp_path / "x.pt"))["latents"].shape[1:] == (4, 32, 32)


# -----------------------------------------------------------------------------
# train_latent_stargan.py, on latents that encode_latents.py makes from a tiny IDX set with the tiny VAE

STARGAN_TINY = ["--g_dim", 16, "--g_blocks", 2, "--e_dim", 8, "--d_dim", 8, "--f_dim", 16, "--style_dim", 8,
                "--latent_dim", 4, "--batch_size", 8, "--epoch_size", 32, "--n_samples", 2, "--eval_interval", 0,
                "--device", "cpu"]
STARGAN_KEYS = {"epoch", "step", "d_loss", "g_loss", "g_adv", "sty", "ds", "cyc", "id", "r1", "d_real", "d_fake",
                "lambda_ds", "imgs_per_sec", "time"}
STARGAN_EVAL = {"acc_ref", "acc_lat", "fd_0", "fd_1", "fd_2", "fd_mean", "div", "cyc_err"}
STARGAN_EVAL_ONCE = {"clf_acc", "fd_real"}


@pytest.fixture(scope="session")
def tiny_latents(tmp_path_factory, tiny_vae):
    folder = tmp_path_factory.mktemp("tiny_latents")
    data = write_tiny_mnist(str(folder / "idx"), n_train=300, n_test=10)
    out = str(folder / "lat.pt")
    run("encode_latents.py", "--source", "idx", "--images", data, "--classes", "0,1,2", "--size", 32,
        "--vae", tiny_vae, "--out", out, "--max_per_domain", 20)
    return out


def stargan(latents, out_dir, *extra, check=True):
    return run("train_latent_stargan.py", "--data", latents, "--out_dir", out_dir, *STARGAN_TINY, *map(str, extra), check=check)


def test_stargan_trains_and_logs_every_loss(tiny_latents, tmp_path):
    out = str(tmp_path / "s")
    p = stargan(tiny_latents, out, "--epochs", 3, "--ds_decay_epochs", 2, "--r1_interval", 2, "--log_interval", 2,
                "--w_sty", 0.5, "--w_cyc", 2, "--eval_interval", 2)
    assert "0, 1, 2: 54 training and 6 held-out latents 4x4x4, 4 steps/epoch" in p.stdout
    log = load_log(out)
    assert log["script"] == "train_latent_stargan.py"
    for k in ("w_adv", "w_sty", "w_ds", "ds_decay_epochs", "ds_margin", "w_cyc", "w_id", "w_r1", "r1_interval",
              "latent_scale", "epoch_size", "batch_size", "lr", "f_lr", "betas", "weight_decay", "ema", "seed", "compile"):
        assert k in log["config"], k
    recs = log["records"]
    assert [r["epoch"] for r in recs] == [1, 2, 3] and [r["step"] for r in recs] == [4, 8, 12]
    assert [r["lambda_ds"] for r in recs] == [1.0, 0.5, 0.0]  # ds_decay_epochs 2: w_ds, w_ds/2, then 0 from epoch 3
    cfg = log["config"]
    evaluated = {2: STARGAN_EVAL | STARGAN_EVAL_ONCE, 3: STARGAN_EVAL}  # epoch 2, and the end (the reference: once)
    for r in recs:
        keys = STARGAN_KEYS | evaluated.get(r["epoch"], set())
        assert set(r) == keys, set(r) ^ keys
        assert all(np.isfinite(v) for v in r.values())
        # g_loss is the weighted sum seed 001 writes; lambda_ds is constant in an epoch, so the means obey it too
        expect = (cfg["w_adv"] * r["g_adv"] + cfg["w_sty"] * r["sty"] + cfg["w_cyc"] * r["cyc"] + cfg["w_id"] * r["id"]
                  - r["lambda_ds"] * r["ds"])
        assert r["g_loss"] == pytest.approx(expect, rel=1e-5, abs=1e-6)
        assert r["r1"] > 0 and r["id"] > 0 and r["ds"] >= 0 and r["cyc"] > 0
        assert 0 < r["d_loss"] < 4  # hinge near 2 at the start
    for kind in ("ref", "lat"):
        for e in (1, 2, 3):
            path = os.path.join(out, "samples", f"{kind}_epoch00{e}.png")
            img = np.asarray(Image.open(path).convert("RGB"))
            rows = 3 if kind == "ref" else 2  # ref: a row of references above the 2 sources
            assert img.shape == (2 + rows * 34, 2 + 4 * 34, 3)  # 32 px decoded cells, 2 px padding, 1 + 3 domains
            assert img.std() > 5
    for r in recs[1:]:
        assert 0 <= r["acc_ref"] <= 1 and 0 <= r["acc_lat"] <= 1 and r["div"] >= 0 and r["cyc_err"] > 0
        assert r["fd_mean"] == pytest.approx(np.mean([r["fd_0"], r["fd_1"], r["fd_2"]]))
    assert 0 <= recs[1]["clf_acc"] <= 1 and recs[1]["fd_real"] >= 0
    assert len([f for f in os.listdir(out) if f.startswith("classifier_")]) == 1
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert {"G", "E", "F", "D", "G_ema", "E_ema", "F_ema", "opt_G", "opt_D", "scaler_G", "scaler_D", "rng_cpu"} <= set(ck)
    assert ck["step"] == 12 and ck["epoch"] == 4


def test_stargan_r1_is_zero_off_interval_and_id_when_unweighted(tiny_latents, tmp_path):
    out = str(tmp_path / "s")
    stargan(tiny_latents, out, "--epochs", 2, "--r1_interval", 100, "--w_id", 0)
    recs = load_log(out)["records"]
    # R1 runs at step 0 only (step % 100 == 0): epoch 1 averages one R1 value with 3 zeros, epoch 2 is all zeros
    assert recs[0]["r1"] > 0 and recs[1]["r1"] == 0.0
    assert all(r["id"] == 0.0 for r in recs)


def test_stargan_resume_is_exact(tiny_latents, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    extra = ["--ds_decay_epochs", 2, "--r1_interval", 3, "--eval_interval", 1]  # evaluation must not move training's RNG
    stargan(tiny_latents, a, "--epochs", 3, *extra)
    stargan(tiny_latents, b, "--epochs", 1, *extra)
    p = run("train_latent_stargan.py", "--resume", "--out_dir", b, "--epochs", 3)
    assert "resumed from" in p.stdout
    keys = ["epoch", "step", "d_loss", "g_loss", "g_adv", "sty", "ds", "cyc", "id", "r1", "lambda_ds", "fd_mean", "acc_lat", "div"]
    ra, rb = load_log(a)["records"], load_log(b)["records"]
    np.testing.assert_allclose([[r[k] for k in keys] for r in rb], [[r[k] for k in keys] for r in ra], rtol=1e-5, atol=1e-6)
    ka, kb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (a, b))
    for net in ("G", "D", "G_ema", "F"):
        for k in ka[net]:
            torch.testing.assert_close(kb[net][k], ka[net][k], rtol=1e-5, atol=1e-6)


def test_stargan_without_a_vae_saves_latent_mosaics(tiny_latents, tmp_path):
    d = load_pt(tiny_latents)
    d["vae"] = str(tmp_path / "gone")  # the VAE the file names is not here
    moved = str(tmp_path / "moved.pt")
    torch.save(d, moved)
    out = str(tmp_path / "s")
    p = stargan(moved, out, "--epochs", 1)
    notes = [l for l in p.stdout.splitlines() if l.startswith("samples:")]
    assert len(notes) == 1 and "cannot load the VAE" in notes[0] and "2x2 grayscale mosaic" in notes[0]
    img = Image.open(os.path.join(out, "samples", "lat_epoch001.png"))
    assert img.mode == "L" and img.size == ((2 + 4 * 10) * 16, (2 + 2 * 10) * 16)  # 8x8 mosaics + 2 px padding, scaled 16x


def test_stargan_warns_on_a_latent_scale_unlike_the_files(tiny_latents, tmp_path):
    p = stargan(tiny_latents, str(tmp_path / "s"), "--epochs", 1, "--latent_scale", 0.13025)
    assert "warning: --latent_scale 0.13025 differs from the scaling_factor 0.18215" in p.stderr


def test_stargan_bad_input(tiny_latents, tmp_path):
    def bad(d, name):
        path = str(tmp_path / name)
        torch.save(d, path)
        return path
    good = load_pt(tiny_latents)
    cases = [
        (str(tmp_path / "missing.pt"), ["no such file", "encode_latents.py"]),
        (bad({"weights": torch.zeros(3)}, "foreign.pt"), ["not a latents file of encode_latents.py"]),
        (bad({**good, "labels": torch.zeros_like(good["labels"]), "domains": ["0"]}, "one.pt"), ["1 domain", "at least 2"]),
        (bad({**good, "latents": good["latents"].flatten(2)}, "rank.pt"), ["expected (N, C, H, W)"]),
    ]
    open(tmp_path / "junk.pt", "wb").write(b"junk")
    cases.append((str(tmp_path / "junk.pt"), ["cannot be loaded"]))
    for path, needles in cases:
        assert_one_line_error(stargan(path, str(tmp_path / "o"), "--epochs", 1, check=False), *needles)
    for flags, needle in ((["--val_fraction", 0, "--eval_interval", 1], "evaluation needs held-out latents"),
                          (["--g_blocks", 3], "--g_blocks must be even"), (["--epoch_size", 4], "counts samples"),
                          (["--w_ds", -1], "--w_ds must be zero or positive"), (["--r1_interval", 0], "--r1_interval must be at least 1")):
        assert_one_line_error(stargan(tiny_latents, str(tmp_path / "o"), *flags, check=False), needle)


def test_stargan_resume_on_other_data_is_refused(tiny_latents, tmp_path):
    out = str(tmp_path / "s")
    stargan(tiny_latents, out, "--epochs", 1)
    d = load_pt(tiny_latents)
    keep = d["labels"] < 2  # two of the three domains: the per-domain heads no longer fit
    two = str(tmp_path / "two.pt")
    torch.save({**d, "latents": d["latents"][keep], "labels": d["labels"][keep], "domains": d["domains"][:2]}, two)
    p = run("train_latent_stargan.py", "--resume", "--out_dir", out, "--data", two, check=False)
    assert_one_line_error(p, "does not fit this run", "new --out_dir")


def test_stargan_nan_names_the_step_and_the_loss(tiny_latents, tmp_path):
    out = str(tmp_path / "s")
    stargan(tiny_latents, out, "--epochs", 1)
    p = run("train_latent_stargan.py", "--resume", "--out_dir", out, "--epochs", 3, "--lr", 1e30, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "non-finite" in last and "at step" in last and "last good checkpoint" in last and "(step 4)" in last, last
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 4


def test_stargan_compiled_bf16_path_on_cpu(tiny_latents, tmp_path, monkeypatch):
    # The CUDA configuration (torch.compile of G, E, F and D, bf16 autocast, R1 through the raw D) run in-process
    # on the CPU. The aot_eager backend traces and differentiates the same graphs as on a GPU; only the CPU code
    # generation is left out, which would take minutes here and is not what a GPU runs anyway.
    import functools
    import train_latent_stargan as sg
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    out = str(tmp_path / "c")
    sg.main(list(map(str, ["--data", tiny_latents, "--out_dir", out, *STARGAN_TINY, "--epochs", 2, "--r1_interval", 2,
             "--compile", "--dtype", "bfloat16"])))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    recs = load_log(out)["records"]
    assert len(recs) == 2 and recs[0]["r1"] > 0 and all(np.isfinite(r["g_loss"]) and np.isfinite(r["d_loss"]) for r in recs)
    assert load_log(out)["config"]["compile"] is True
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in ck["G"])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_stargan_on_gpu(tiny_latents, tmp_path):
    out = str(tmp_path / "gpu")
    p = run("train_latent_stargan.py", "--data", tiny_latents, "--out_dir", out, *STARGAN_TINY[:-2], "--epochs", 2,
            "--device", "cuda", "--r1_interval", 2, timeout=900)
    assert "bfloat16 compiled" in p.stdout
    assert all(np.isfinite(r["d_loss"]) and r["r1"] > 0 for r in load_log(out)["records"])


# -----------------------------------------------------------------------------
# plot_losses.py, on logs the tests write in each trainer's shape

def stargan_log(n=12, **over):
    """A log.json in train_latent_stargan.py's shape: a calm hinge run, with over[key] replacing a curve."""
    e = np.arange(1, n + 1)
    curves = {"d_loss": 1.9 - 0.03 * e, "g_loss": 2.0 - 0.05 * e, "g_adv": 0.4 + 0.02 * e, "sty": 0.3 - 0.01 * e,
              "ds": 0.2 + 0.001 * e, "cyc": 0.5 - 0.02 * e, "id": 0.3 - 0.01 * e, "r1": 0.002 + 0 * e,
              "lambda_ds": np.clip(1 - (e - 1) / 20, 0, 1), "d_real": 0.3 + 0.02 * e, "d_fake": -0.3 - 0.02 * e,
              "imgs_per_sec": 900 + 0 * e, "time": 10.0 * e}
    curves.update(over)
    cfg = {"w_adv": 1, "w_sty": 1, "w_ds": 1, "w_cyc": 1, "w_id": 1, "w_r1": 2, "r1_interval": 16, "ds_decay_epochs": 20,
           "epoch_size": 6144, "batch_size": 64}
    recs = [{"epoch": int(i), "step": int(96 * i), **{k: float(v[i - 1]) for k, v in curves.items()}} for i in e]
    return {"script": "train_latent_stargan.py", "config": cfg, "records": recs}


def mnist_log(n=12, loss="bce", **over):
    """A log.json in train_mnist_gan.py's shape (with evaluation figures every 3 epochs): a healthy run."""
    e = np.arange(1, n + 1)
    curves = {"d_loss": 0.62 + 0.005 * np.cos(e), "g_loss": 0.9 + 0.01 * np.sin(e), "d_real": 0.6 + 0 * e,
              "d_fake": 0.42 + 0 * e, "imgs_per_sec": 5000 + 0 * e, "time": 12.0 * e}
    curves.update(over)
    recs = [{"epoch": int(i), "step": int(937 * i), **{k: float(v[i - 1]) for k, v in curves.items()}} for i in e]
    for i, r in enumerate(recs):
        if (i + 1) % 3 == 0:
            r.update(fd=40.0 / (i + 1), kid=2.0 / (i + 1), **{"is": 6.0}, modes=10, kl_uniform=0.02)
    recs[2].update(clf_acc=0.88, fd_real=0.3, kid_real=0.0, is_real=7.3)
    return {"script": "train_mnist_gan.py", "config": {"loss": loss, "lr": 2e-4, "lr_d": 2e-4, "n_critic": 1, "r1": 0.0},
            "records": recs}


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def plot(*args, check=True):
    return run("plot_losses.py", *args, check=check)


def check_picture(path, min_size=(800, 500)):
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert img.shape[1] >= min_size[0] and img.shape[0] >= min_size[1], img.shape
    assert (img < 128).mean() > 0.01 and img.std() > 20  # curves, axes and text on white: not blank
    return img


def test_plot_losses_draws_both_trainers_logs(tmp_path):
    sg = write_json(tmp_path / "sg.json", stargan_log(id=np.zeros(12)))  # w_id 0: id is logged as constant 0
    p = plot(sg)
    out = tmp_path / "losses.png"  # default: beside the first log
    assert f"wrote {out}" in p.stdout
    check_picture(out)
    mn = write_json(tmp_path / "mn.json", mnist_log())
    plot(mn, "--out", tmp_path / "m.png", "--smooth", 3, "--x", "step")
    check_picture(tmp_path / "m.png")
    for ext in ("svg", "pdf"):  # the format follows the extension
        plot(mn, "--out", tmp_path / f"m.{ext}")
    assert open(tmp_path / "m.svg").read(200).lstrip().startswith("<?xml") and open(tmp_path / "m.pdf", "rb").read(4) == b"%PDF"


def test_plot_losses_panel_order_and_reference_lines():
    import plot_losses as pl
    log = stargan_log(id=np.zeros(12))
    meta, records = {"script": log["script"], "config": log["config"]}, log["records"]
    keys = pl.curve_keys([(meta, records)])
    assert keys[:9] == ["d_loss", "g_loss", "g_adv", "sty", "ds", "cyc", "id", "r1", "lambda_ds"]
    assert keys[-1] == "imgs_per_sec" and keys[9:11] == ["d_real", "d_fake"]
    assert pl.reference_lines(meta, "d_loss", records) == [(2.0, "hinge: logits near 0")]
    assert pl.lambda_zero_x(meta, records, "epoch") == 21.0 and pl.lambda_zero_x(meta, records, "step") == 21 * 96
    m = mnist_log()
    mm = {"script": m["script"], "config": m["config"]}
    assert pl.reference_lines(mm, "d_loss", m["records"])[0][0] == pytest.approx(np.log(2))  # seed 004's d_loss at D = 1/2
    assert pl.reference_lines(mm, "g_loss", m["records"])[0][0] == pytest.approx(np.log(2))
    assert pl.reference_lines(mm, "fd", m["records"]) == [(0.3, "real data")]
    mm["config"]["loss"] = "minimax"
    assert pl.reference_lines(mm, "g_loss", m["records"])[0][0] == pytest.approx(-np.log(2))


def test_plot_losses_overlays_runs_and_reads_other_formats(tmp_path):
    a = write_json(tmp_path / "a" / "log.json", mnist_log()) if os.makedirs(tmp_path / "a") is None else None
    b = write_json(tmp_path / "b.json", mnist_log(loss="minimax")["records"])  # a bare list of records
    lines = [json.dumps(r) for r in mnist_log(n=6)["records"]]
    c = tmp_path / "c.jsonl"
    c.write_text("\n".join(lines) + "\n" + lines[0][:25])  # JSON Lines, the last line still being written
    p = plot(a, b, str(c), "--out", tmp_path / "o.png", "--diagnose")
    assert "skipping the truncated last line 7" in p.stderr
    assert "[a]" in p.stdout and "[tmp" not in p.stdout  # labels: folder names
    check_picture(tmp_path / "o.png")
    p = plot(a, b, "--labels", "bce,minimax", "--out", tmp_path / "o2.png", "--diagnose")
    assert "[bce]" in p.stdout and "[minimax]" in p.stdout
    gap = mnist_log()
    del gap["records"][4]["g_loss"]  # a missing key leaves a gap, nothing more
    plot(write_json(tmp_path / "gap.json", gap), "--out", tmp_path / "gap.png")
    p = plot(a, "--labels", "x,y", check=False)
    assert_one_line_error(p, "--labels names 2 runs, 1 logs")


def test_plot_losses_reads_a_log_while_training_writes_it(tiny_mnist, tmp_path):
    import plot_losses as pl
    out = str(tmp_path / "live")
    args = mnist_args(tiny_mnist, out, "--epochs", 300, "--batch_size", 64, "--log_interval", 100, "--sample_interval", 100000)
    proc = subprocess.Popen([PY, os.path.join(HERE, "train_mnist_gan.py"), *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    reads, seen = 0, set()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(seen) < 20:
            if os.path.exists(os.path.join(out, "log.json")):
                meta, records = pl.read_log(os.path.join(out, "log.json"))  # never half a file: written atomically
                seen.add(len(records))
                reads += 1
    finally:
        proc.kill()
        proc.wait()
    assert reads > 20 and len(seen) >= 5, (reads, seen)


def diagnosis(tmp_path, log, *flags):
    path = write_json(tmp_path / f"d{len(os.listdir(tmp_path))}.json", log)
    return plot(path, "--diagnose", "--no_plot", "--labels", "run", *flags).stdout


def test_diagnose_healthy_runs_have_no_findings_but_r1(tmp_path):
    out = diagnosis(tmp_path, mnist_log())
    assert "no findings" in out
    out = diagnosis(tmp_path, stargan_log())
    assert out.count("\n") == 1 and "r1 averages" in out  # r1's effective share is always reported


def test_diagnose_divergence(tmp_path):
    g = 0.9 + 0 * np.arange(12.0)
    g[6] = float("nan")
    out = diagnosis(tmp_path, mnist_log(g_loss=g))
    assert "g_loss is nan at epoch 7" in out
    d = 0.6 + 0 * np.arange(12.0)
    d[9:] = [50.0, 500.0, 5000.0]
    out = diagnosis(tmp_path, mnist_log(d_loss=d))
    assert "d_loss reaches 50 at epoch 10" in out and "diverging" in out
    assert "diverg" not in diagnosis(tmp_path, mnist_log(d_loss=0.6 + 0.5 * np.arange(12.0) / 12))


def test_diagnose_d_dominates(tmp_path):
    e = np.arange(12.0)
    out = diagnosis(tmp_path, mnist_log(d_loss=0.6 * np.exp(-e / 2), g_loss=1 + 0.5 * e))
    assert "D dominates" in out and "balance 0.693" in out and "g_loss climbed from 1.750 to 5.750" in out  # means of the first and last 4 epochs
    out = diagnosis(tmp_path, stargan_log(d_loss=1.9 * np.exp(-e / 2), g_adv=0.3 + 0.3 * e))
    assert "D dominates" in out and "g_adv climbed" in out
    assert "D dominates" not in diagnosis(tmp_path, mnist_log(d_loss=0.6 * np.exp(-e / 2), g_loss=1 - 0.01 * e))
    assert "D dominates" not in diagnosis(tmp_path, mnist_log(loss="wgan", d_loss=-e, g_loss=e))  # no balance level


def test_diagnose_d_stopped_learning(tmp_path):
    e = np.arange(12.0)
    pinned = 2.0 + 2 * 16 * 0.002 + 0.01 * np.sin(e)  # hinge 2 plus R1's share (w_r1 * r1_interval * r1)
    out = diagnosis(tmp_path, stargan_log(d_loss=pinned))
    assert "D stopped learning" in out and "hinge part of d_loss" in out and "for 12 epochs from epoch 1" in out
    out = diagnosis(tmp_path, mnist_log(d_real=0.5 + 0.01 * np.sin(e), d_fake=0.49 + 0 * e))
    assert "D(x) and D(G(z)) both stay within 0.05 of 1/2" in out
    assert "stopped" not in diagnosis(tmp_path, stargan_log(d_loss=1.9 - 0.05 * e))
    assert "stopped" not in diagnosis(tmp_path, stargan_log(d_loss=2.0 + 0.3 * np.sin(e * 1.3)))
    out = diagnosis(tmp_path, stargan_log(d_loss=2.0 + 0.2 * np.sin(e)), "--pinned_tol", 0.3)  # thresholds are flags
    assert "stopped" in out


def test_diagnose_diversity(tmp_path):
    e = np.arange(1, 13.0)
    lam = np.clip(1 - (e - 1) / 5, 0, 1)
    out = diagnosis(tmp_path, stargan_log(lambda_ds=lam))
    assert "lambda_ds is 0 from epoch 6 on" in out
    assert "lambda_ds is 0" not in diagnosis(tmp_path, stargan_log())
    out = diagnosis(tmp_path, stargan_log(ds=0.3 * np.exp(-e / 2)))  # lambda_ds is still ~0.5 at epoch 12
    assert "diversity is collapsing while it is still rewarded: ds fell from 0.1820 (epoch 1) to 0.0007 (epoch 12)" in out
    assert "collapsing" not in diagnosis(tmp_path, stargan_log(ds=0.3 - 0.005 * e))


def test_diagnose_r1_effective_contribution(tmp_path):
    out = diagnosis(tmp_path, stargan_log(r1=0.003 + 0 * np.arange(12.0), d_loss=1.5 + 0 * np.arange(12.0)))
    assert "r1 averages 0.003 over the last 4 epochs (the raw penalty, 0 on 15 of every 16 steps)" in out
    assert "w_r1 * r1_interval = 2 * 16 x 0.003 = 0.096 to d_loss on average, 6.4% of d_loss 1.500" in out
    assert "r1 averages" not in diagnosis(tmp_path, stargan_log(r1=np.zeros(12)))
    log = mnist_log(r1=0.01 + 0 * np.arange(12.0))
    log["config"]["r1"] = 10.0  # --r1 GAMMA: GAMMA/2 on every step
    assert "GAMMA/2 = 5 x 0.01 = 0.05 to d_loss" in diagnosis(tmp_path, log)


def test_diagnose_oscillation(tmp_path):
    e = np.arange(24.0)
    out = diagnosis(tmp_path, mnist_log(n=24, g_loss=1.2 + 0.4 * np.sin(2 * np.pi * e / 6)))
    assert "g_loss swings with a period of about 6 epochs and an amplitude of 0.39" in out
    assert "swings" not in diagnosis(tmp_path, mnist_log(n=24, g_loss=1.2 + 0.02 * e))
    assert "swings" not in diagnosis(tmp_path, mnist_log(n=24, g_loss=1.2 + 0.01 * np.sin(2 * np.pi * e / 6)))


def test_diagnose_mode_collapse_from_the_evaluation(tmp_path):
    log = mnist_log()
    log["records"][-1].update(modes=3, kl_uniform=1.2)
    out = diagnosis(tmp_path, log)
    assert "mode collapse: the samples cover 3 of 10 classes at epoch 12 (kl_uniform 1.200" in out
    assert "collapse" not in diagnosis(tmp_path, mnist_log())
    log = stargan_log()
    for i, r in enumerate(log["records"]):
        r["div"] = [0.2, 0.25, 0.1, 0.03][i // 3] if i % 3 == 2 else None
    assert "diversity collapse: div fell from 0.25 (epoch 6) to 0.03 (epoch 12)" in diagnosis(tmp_path, log)


def test_plot_losses_annotate_puts_findings_in_the_footer(tmp_path):
    e = np.arange(12.0)
    path = write_json(tmp_path / "log.json", mnist_log(d_loss=0.6 * np.exp(-e / 2), g_loss=1 + 0.5 * e))
    plot(path, "--out", tmp_path / "plain.png")
    plot(path, "--annotate", "--out", tmp_path / "annotated.png")
    plain, annotated = (np.asarray(Image.open(tmp_path / f).convert("L")) for f in ("plain.png", "annotated.png"))
    assert annotated.shape[0] > plain.shape[0]  # a taller figure: the footer
    assert (annotated[-40:] < 128).mean() > 0.005  # text at the bottom


def test_plot_losses_bad_input(tmp_path):
    (tmp_path / "empty.json").write_text("")
    cases = [(str(tmp_path / "missing.json"), "no such file"), (str(tmp_path / "empty.json"), "the file is empty"),
             (write_json(tmp_path / "nolog.json", {"model": "x"}), "no training log"),
             (write_json(tmp_path / "text.json", [{"note": "x"}, {"note": "y"}]), "no record has a numeric value")]
    (tmp_path / "junk.json").write_text("{not json\n{also not\nnor this")
    cases.append((str(tmp_path / "junk.json"), "neither JSON nor JSON Lines"))
    for path, needle in cases:
        assert_one_line_error(plot(path, check=False), needle)
    assert_one_line_error(plot(write_json(tmp_path / "ok.json", mnist_log()), "--out", tmp_path / "x.jpg", check=False),
                          ".png, .svg or .pdf")
