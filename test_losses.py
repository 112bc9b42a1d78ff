"""Each script's copy of a formula, checked against reference snippets copied from the seeds.

The seeds (the documents this project comes from) state the formulas; their snippets are copied
below as they are written there, translated into runnable PyTorch where the seed gives only the
formula. Every script that carries a copy of a function is checked, and a definition that two
scripts share must be identical: the test finds every such pair by parsing the scripts, with no
list to keep.

    python -m pytest -q test_losses.py
"""

import ast
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_latent_stargan as stargan
import train_mnist_gan as mnist

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True, scope="module")
def float64():
    """References and copies are compared to 1e-10, not to float32 noise (restored afterwards)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def logits(n=257, scale=4.0, seed=0):
    return scale * torch.randn(n, 1, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# seed 004: the BCELoss class it builds the GAN on, copied as written there (1e-7 clamp included)


class SeedBCELoss:
    def __call__(self, y_pred, y_true):
        y_pred = torch.clamp(y_pred, min=1e-7, max=1 - 1e-7)  # 防止对数函数中的 NaN
        loss = -(y_true * torch.log(y_pred) + (1 - y_true) * torch.log(1 - y_pred))
        return torch.mean(loss)


def seed004_losses(real_logits, fake_logits):
    """Seed 004's training step, on probabilities D = sigmoid(logits), as its nn.Sigmoid() has."""
    adversarial_loss = SeedBCELoss()
    valid, fake = torch.ones_like(real_logits), torch.zeros_like(fake_logits)
    g_loss = adversarial_loss(torch.sigmoid(fake_logits), valid)
    real_loss = adversarial_loss(torch.sigmoid(real_logits), valid)
    fake_loss = adversarial_loss(torch.sigmoid(fake_logits), fake)
    d_loss = (real_loss + fake_loss) / 2
    return d_loss, g_loss


def test_bce_matches_seed004_bceloss():
    r, f = logits(seed=1), logits(seed=2)  # |logit| < 16 here, where the seed's clamp is inactive
    assert r.abs().max() < 16 and f.abs().max() < 16
    d_ref, g_ref = seed004_losses(r, f)
    torch.testing.assert_close(mnist.d_loss_fn("bce", r, f), d_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mnist.g_loss_fn("bce", f), g_ref, rtol=1e-10, atol=1e-10)


def test_bce_clamp_is_the_only_difference_from_seed004():
    # The seed's clamp caps each term at -log(1e-7) = 16.118; from logits the loss stays exact, with
    # the right gradient. Past |logit| ~ 16.1 the two differ, and only there.
    f = torch.tensor([[-30.0], [30.0]])
    _, g_ref = seed004_losses(f, f)
    cap = -math.log(1e-7)
    assert g_ref.item() == pytest.approx((cap + 0.0) / 2, abs=1e-6)  # the seed saturates at the cap
    assert mnist.g_loss_fn("bce", f).item() == pytest.approx(
        (30.0 + math.log1p(math.exp(-30))) / 2, rel=1e-12
    )


def test_d_loss_at_d_one_half():
    # Seed 004's averaged d_loss when D outputs 1/2 everywhere (logits 0): (ln 2 + ln 2) / 2 = ln 2
    zero = torch.zeros(8, 1)
    assert mnist.d_loss_fn("bce", zero, zero).item() == pytest.approx(math.log(2), rel=1e-12)
    assert mnist.g_loss_fn("bce", zero).item() == pytest.approx(math.log(2), rel=1e-12)
    assert seed004_losses(zero, zero)[0].item() == pytest.approx(math.log(2), rel=1e-12)


# -----------------------------------------------------------------------------
# seeds 000 and 003: the value function V(D, G) = E_x[log D(x)] + E_z[log(1 - D(G(z)))]


def seed_value_function(d_real, d_fake):
    return torch.log(d_real).mean() + torch.log(1 - d_fake).mean()


def test_minimax_losses_are_the_value_function():
    r, f = logits(seed=3), logits(seed=4)
    V = seed_value_function(torch.sigmoid(r), torch.sigmoid(f))
    # D maximises V: seed 000's loss_disc = -V; seed 004 averages the two terms, so d_loss = -V / 2
    torch.testing.assert_close(mnist.d_loss_fn("minimax", r, f), -V / 2)
    # G minimises V; only its second term depends on G: E[log(1 - D(G(z)))]
    torch.testing.assert_close(
        mnist.g_loss_fn("minimax", f), torch.log(1 - torch.sigmoid(f)).mean()
    )
    # seed 000's loss_gen, the non-saturating form: -E[log D(G(z))]
    torch.testing.assert_close(mnist.g_loss_fn("bce", f), -torch.log(torch.sigmoid(f)).mean())


def test_minimax_generator_saturates_where_bce_does_not():
    # Seed 004: early on D rejects the fakes, log(1 - D(G(z))) flattens and G stops learning.
    f = torch.full((4, 1), -8.0, requires_grad=True)
    (g_mm,) = torch.autograd.grad(mnist.g_loss_fn("minimax", f), f)
    (g_ns,) = torch.autograd.grad(mnist.g_loss_fn("bce", f), f)
    assert g_mm.abs().max() < 1e-3 < g_ns.abs().min()


def optimal_discriminator(counts_data, counts_g):
    """D* found by minimising the script's d_loss_fn ("bce") over one free logit per support point,
    on a sample that holds point k counts_data[k] times among the reals and counts_g[k] times among
    the fakes."""
    k = len(counts_data)
    idx_d = torch.repeat_interleave(torch.arange(k), torch.tensor(counts_data))
    idx_g = torch.repeat_interleave(torch.arange(k), torch.tensor(counts_g))
    t = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS(
        [t],
        lr=1,
        max_iter=5000,
        tolerance_grad=1e-13,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = mnist.d_loss_fn("bce", t[idx_d], t[idx_g])
        loss.backward()
        return loss

    opt.step(closure)
    return torch.sigmoid(t.detach())


def test_optimal_discriminator_is_pdata_over_sum():
    # Seed 004, proposition 1: for a fixed G, D*(x) = p_data(x) / (p_data(x) + p_g(x))
    counts_data, counts_g = (
        [10, 6, 3, 1],
        [2, 4, 6, 8],
    )  # p_data = counts_data / 20, p_g = counts_g / 20
    p_data, p_g = torch.tensor(counts_data) / 20.0, torch.tensor(counts_g) / 20.0
    torch.testing.assert_close(
        optimal_discriminator(counts_data, counts_g), p_data / (p_data + p_g), rtol=1e-7, atol=1e-7
    )


def test_virtual_criterion_is_minus_log4_at_pg_equal_pdata():
    # Seed 004, theorem 1: C(G) = max_D V(G, D) = -log 4 + 2 JSD(p_data || p_g), and -log 4 iff p_g
    # = p_data
    def C(counts_data, counts_g):
        p, q = torch.tensor(counts_data) / sum(counts_data), torch.tensor(counts_g) / sum(counts_g)
        d_star = optimal_discriminator(counts_data, counts_g)
        return (p * torch.log(d_star)).sum() + (q * torch.log(1 - d_star)).sum(), p, q  # V(G, D*)

    c, p, _ = C([8, 7, 5], [8, 7, 5])
    assert c.item() == pytest.approx(-math.log(4), abs=1e-9)
    c, p, q = C([8, 7, 5], [2, 6, 12])
    m = (p + q) / 2
    jsd = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    assert c.item() == pytest.approx(-math.log(4) + 2 * jsd.item(), abs=1e-9)
    assert c.item() > -math.log(4) + 0.1


# -----------------------------------------------------------------------------
# seed 002: WGAN and WGAN-GP, as its formulas read


def seed002_wgan(d_real, d_fake):
    L_G = -d_fake.mean()  # L_G = -E_z[D(G(z))]
    L_D = d_real.mean() - d_fake.mean()  # L_D = E_x[D(x)] - E_z[D(G(z))]
    return L_D, L_G


def test_wgan_matches_seed002():
    r, f = logits(seed=5), logits(seed=6)
    L_D, L_G = seed002_wgan(r, f)
    # Seed 002 writes L_D = E[D(x)] - E[D(G(z))] as the critic's loss. That is the Wasserstein
    # estimate the critic MAXIMISES (minimising it would train the critic backwards, against its own
    # G loss). The critic's loss to minimise is its negative, which is what the script uses.
    for loss in ("wgan", "wgan-gp"):
        torch.testing.assert_close(mnist.d_loss_fn(loss, r, f), -L_D)
        torch.testing.assert_close(mnist.g_loss_fn(loss, f), L_G)


class LinearD(torch.nn.Module):
    """D(x) = w . flatten(x) + b: its input gradient is w everywhere."""

    def __init__(self, dim, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(dim, generator=g))
        self.b = torch.nn.Parameter(torch.randn(1, generator=g))

    def forward(self, x):
        return (x.flatten(1) @ self.w + self.b).unsqueeze(1)


def test_gradient_penalty_of_a_linear_critic():
    # Seed 002: lambda * E[(||grad_x_hat D(x_hat)||_2 - 1)^2]; for a linear D that is (||w|| - 1)^2
    D = LinearD(12)
    real, fake = torch.randn(16, 3, 2, 2), torch.randn(16, 3, 2, 2)
    gp = mnist.gradient_penalty(D, real, fake)
    torch.testing.assert_close(gp, (D.w.norm() - 1) ** 2)
    # the penalty reaches D's weights (create_graph): d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    (grad_w,) = torch.autograd.grad(gp, D.w)
    torch.testing.assert_close(grad_w, 2 * (D.w.norm() - 1) * D.w / D.w.norm())


def test_gradient_penalty_is_taken_at_interpolates():
    # A quadratic critic D(x) = 0.5 ||x||^2 has grad x: the penalty depends on where it is taken.
    class Quadratic(torch.nn.Module):
        def forward(self, x):
            return 0.5 * x.flatten(1).pow(2).sum(1, keepdim=True)

    real, fake = torch.randn(64, 5), torch.randn(64, 5) + 3
    torch.manual_seed(7)
    gp = mnist.gradient_penalty(Quadratic(), real, fake)
    torch.manual_seed(7)  # the same eps ~ U[0, 1] per sample the function draws
    eps = torch.rand(64, 1)
    x_hat = eps * real + (1 - eps) * fake
    torch.testing.assert_close(gp, ((x_hat.norm(dim=1) - 1) ** 2).mean())
    at_fakes = ((fake.norm(dim=1) - 1) ** 2).mean()  # seed 002's snippet: the gradient at the fakes
    assert abs(gp.item() - at_fakes.item()) > 0.1


# -----------------------------------------------------------------------------
# R1 (seed 001's definition): mean over the batch of sum(grad^2), grad = d(sum logits)/dx


@pytest.mark.parametrize(
    "script", [mnist, stargan], ids=["train_mnist_gan", "train_latent_stargan"]
)
def test_r1_of_a_linear_discriminator_is_its_squared_weight_norm(script):
    D = LinearD(12, seed=3)
    x = torch.randn(10, 3, 2, 2, requires_grad=True)
    r1 = script.r1_penalty(D(x), x)
    torch.testing.assert_close(r1, D.w.pow(2).sum())
    (grad_w,) = torch.autograd.grad(
        r1, D.w
    )  # it is differentiable in D's weights: d/dw ||w||^2 = 2w
    torch.testing.assert_close(grad_w, 2 * D.w)


@pytest.mark.parametrize(
    "script", [mnist, stargan], ids=["train_mnist_gan", "train_latent_stargan"]
)
def test_r1_matches_seed001_snippet(script):
    # seed 001: grad = d(sum logits)/dx; flatten; mean(sum(grad^2))
    torch.manual_seed(0)
    D = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    )
    x = torch.randn(6, 3, 2, 2, requires_grad=True)
    out = D(x)
    grad = torch.autograd.grad(out.sum(), x, create_graph=True)[0]
    ref = grad.view(grad.size(0), -1).pow(2).sum(1).mean()
    torch.testing.assert_close(script.r1_penalty(out, x), ref)


# -----------------------------------------------------------------------------
# the other losses of train_mnist_gan.py, from their papers


def test_hinge_and_lsgan():
    r, f = logits(seed=8), logits(seed=9)
    torch.testing.assert_close(
        mnist.d_loss_fn("hinge", r, f),
        torch.clamp(1 - r, min=0).mean() + torch.clamp(1 + f, min=0).mean(),
    )
    torch.testing.assert_close(mnist.g_loss_fn("hinge", f), -f.mean())
    torch.testing.assert_close(
        mnist.d_loss_fn("lsgan", r, f), 0.5 * ((r - 1) ** 2).mean() + 0.5 * (f**2).mean()
    )
    torch.testing.assert_close(mnist.g_loss_fn("lsgan", f), 0.5 * ((f - 1) ** 2).mean())
    zero = torch.zeros(5, 1)
    assert mnist.d_loss_fn("hinge", zero, zero).item() == 2.0  # logits near 0: hinge d_loss near 2


def test_every_loss_at_zero_logits_and_unknown_ones_fail():
    # D(x) = D(G(z)) = 1/2 (logits 0): each loss's known value, for D and for G
    expect = {  # loss: (d_loss, g_loss)
        "bce": (math.log(2), math.log(2)),
        "minimax": (math.log(2), -math.log(2)),
        "wgan": (0.0, 0.0),
        "wgan-gp": (0.0, 0.0),
        "hinge": (2.0, 0.0),
        "lsgan": (0.5, 0.5),
        "rpgan": (math.log(2), math.log(2)),
    }
    assert set(expect) == set(mnist.LOSSES)
    zero = torch.zeros(7, 1)
    for loss, (d, g) in expect.items():
        assert mnist.d_loss_fn(loss, zero, zero).item() == pytest.approx(d, abs=1e-12), loss
        assert mnist.g_loss_fn(loss, zero, zero).item() == pytest.approx(g, abs=1e-12), loss
    with pytest.raises(ValueError):
        mnist.d_loss_fn("nope", zero, zero)
    with pytest.raises(ValueError):
        mnist.g_loss_fn("nope", zero)


# -----------------------------------------------------------------------------
# RpGAN (Huang et al. 2024, "The GAN is dead; long live the GAN!"), written from its equations:
# L_D = E_{x, z}[f(D(G(z)) - D(x))], L_G = E_{x, z}[f(D(x) - D(G(z)))], f(t) = softplus(t) =
# -log(sigmoid(-t)), over pairs of a real and a fake; R1 and R2: E||grad D||^2 at reals, fakes


def rpgan_reference(real, fake):
    pairs = list(zip(real.flatten().tolist(), fake.flatten().tolist()))
    f = lambda t: math.log1p(math.exp(t))  # noqa: E731
    L_D = sum(f(d_fake - d_real) for d_real, d_fake in pairs) / len(pairs)
    L_G = sum(f(d_real - d_fake) for d_real, d_fake in pairs) / len(pairs)
    return L_D, L_G


def test_rpgan_matches_its_equations_pair_by_pair():
    r, f = logits(n=33, seed=20), logits(n=33, seed=21)
    L_D, L_G = rpgan_reference(r, f)
    assert mnist.d_loss_fn("rpgan", r, f).item() == pytest.approx(L_D, rel=1e-12)
    assert mnist.g_loss_fn("rpgan", f, r).item() == pytest.approx(L_G, rel=1e-12)
    for kind in ("rpgan",):
        assert stargan.d_adv_loss(kind, r, f).item() == pytest.approx(L_D, rel=1e-12)
        assert stargan.g_adv_loss(kind, f, r).item() == pytest.approx(L_G, rel=1e-12)
    # per pair, not per batch: pairing the reals in another order changes the loss
    shuffled = r[torch.randperm(33, generator=torch.Generator().manual_seed(0))]
    assert abs(mnist.d_loss_fn("rpgan", shuffled, f).item() - L_D) > 1e-3
    # G's loss reads the real logits: it moves with them, and refuses to go without them
    assert mnist.g_loss_fn("rpgan", f, r + 1).item() > L_G
    with pytest.raises(ValueError, match="real logits"):
        mnist.g_loss_fn("rpgan", f)
    with pytest.raises(ValueError, match="real logits"):
        stargan.g_adv_loss("rpgan", f)


def test_stargan_nsgan_is_stargan_v2s_bce():
    # StarGAN v2's adv_loss(logits, target) = BCE-with-logits against a constant target
    def adv_loss(out, target):
        return F.binary_cross_entropy_with_logits(out, torch.full_like(out, float(target)))

    r, f = logits(seed=22), logits(seed=23)
    torch.testing.assert_close(stargan.d_adv_loss("nsgan", r, f), adv_loss(r, 1) + adv_loss(f, 0))
    torch.testing.assert_close(stargan.g_adv_loss("nsgan", f), adv_loss(f, 1))
    # hinge is seed 001's, through the same entry points
    torch.testing.assert_close(stargan.d_adv_loss("hinge", r, f), seed001_d_hinge_loss(r, f))
    torch.testing.assert_close(stargan.g_adv_loss("hinge", f), seed001_g_adversarial_loss(f))


@pytest.mark.parametrize(
    "script", [mnist, stargan], ids=["train_mnist_gan", "train_latent_stargan"]
)
def test_r1_and_r2_in_one_double_backward_equal_two(script):
    torch.manual_seed(0)
    D = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    )
    real, fake = torch.randn(5, 3, 2, 2), torch.randn(7, 3, 2, 2)
    r1, r2 = script.r1_r2_penalty(D, real, fake)
    xr, xf = real.clone().requires_grad_(True), fake.clone().requires_grad_(True)
    torch.testing.assert_close(r1, script.r1_penalty(D(xr), xr))
    torch.testing.assert_close(r2, script.r1_penalty(D(xf), xf))  # R2: R1's formula at the fakes
    # both reach D's weights, as the separate penalties do (the last bias is in neither)
    params = list(D.parameters())[:-1]
    g_one = torch.autograd.grad(r1 + r2, params)
    xr, xf = real.clone().requires_grad_(True), fake.clone().requires_grad_(True)
    sep = script.r1_penalty(D(xr), xr) + script.r1_penalty(D(xf), xf)
    for a, b in zip(g_one, torch.autograd.grad(sep, params)):
        torch.testing.assert_close(a, b)


def test_gamma_decays_on_a_cosine():
    assert mnist.gamma_at(10.0, None, 500, 1000) == 10.0  # no --gamma_end: constant
    got = [mnist.gamma_at(10.0, 1.0, t, 1000) for t in (0, 250, 500, 1000, 2000)]
    expect = [1 + 9 * 0.5 * (1 + math.cos(math.pi * t / 1000)) for t in (0, 250, 500, 1000, 1000)]
    assert got == pytest.approx(expect, rel=1e-12) and got[0] == 10.0 and got[-1] == 1.0


# -----------------------------------------------------------------------------
# seed 001: the latent StarGAN's losses (loss.py) and schedule (trainer.py), as the seed writes them


def seed001_d_hinge_loss(real, fake):
    return torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()


def seed001_g_adversarial_loss(fake_logits):
    return -torch.mean(fake_logits)


def seed001_lambda_ds(epoch, w_ds, ds_decay_epochs):
    total_decay = ds_decay_epochs
    progress = min(max((epoch - 1) / total_decay, 0), 1)  # clamp((epoch - 1) / total_decay, 0, 1)
    return w_ds * (1 - progress)


def l1(a, b):
    return torch.mean(torch.abs(a - b))


def test_stargan_adversarial_losses_match_seed001():
    r, f = logits(seed=12), logits(seed=13)
    torch.testing.assert_close(stargan.d_hinge_loss(r, f), seed001_d_hinge_loss(r, f))
    torch.testing.assert_close(stargan.g_adversarial_loss(f), seed001_g_adversarial_loss(f))
    # seed 001: "when D's logits are all about 0, relu(1 - 0) = 1 and relu(1 + 0) = 1, so the hinge
    # loss is about 2"
    zero = torch.zeros(16)
    assert stargan.d_hinge_loss(zero, zero).item() == 2.0
    # and d_loss = 0.5 * (d_loss_ref + d_loss_lat) is 2 as well when every logit is 0
    assert 0.5 * (stargan.d_hinge_loss(zero, zero) + stargan.d_hinge_loss(zero, zero)).item() == 2.0
    # the hinge saturates: logits past the margin (real > 1, fake < -1) cost nothing
    assert stargan.d_hinge_loss(torch.full((4,), 3.0), torch.full((4,), -2.0)).item() == 0.0


def test_stargan_l1_terms_match_seed001():
    a, b = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    s, t = torch.randn(4, 64), torch.randn(4, 64)
    torch.testing.assert_close(stargan.style_reconstruction_loss(s, t), l1(s, t))
    torch.testing.assert_close(stargan.cycle_consistency_loss(a, b), l1(a, b))
    torch.testing.assert_close(stargan.identity_loss(a, b), l1(a, b))
    torch.testing.assert_close(stargan.diversity_sensitive_loss(a, b), l1(a, b))
    torch.testing.assert_close(
        stargan.diversity_sensitive_loss(a, b, margin=10.0), l1(a, b)
    )  # under the margin


def test_stargan_ds_is_clamped_at_the_margin():
    a = torch.zeros(2, 4, 4, 4, requires_grad=True)
    b = torch.full((2, 4, 4, 4), 3.0)  # L1 distance 3
    ds = stargan.diversity_sensitive_loss(a, b, margin=1.5)
    assert ds.item() == 1.5
    (grad,) = torch.autograd.grad(ds, a)  # past the margin, ds no longer pushes the outputs apart
    assert grad.abs().max() == 0
    assert stargan.diversity_sensitive_loss(a, b, margin=None).item() == 3.0


def test_lambda_ds_decays_to_zero_at_ds_decay_epochs_plus_one():
    # seed 001: with ds_decay_epochs 20, w_ds at epoch 1, and 0 from epoch 21 on
    got = [stargan.lambda_ds(e, 1.0, 20) for e in (1, 11, 21, 30)]
    assert got == [1.0, 0.5, 0.0, 0.0]
    for w_ds, decay in ((1.0, 20), (2.0, 5), (0.5, 1), (1.0, 3)):
        for e in range(1, 40):
            assert stargan.lambda_ds(e, w_ds, decay) == pytest.approx(
                seed001_lambda_ds(e, w_ds, decay), abs=1e-15
            )
    assert (
        stargan.lambda_ds(50, 1.0, 0) == 1.0
    )  # 0: no decay (the seed's formula would divide by zero)


def tiny_stargan(seed=0, size=8, K=3):
    torch.manual_seed(seed)
    return (
        stargan.Generator(4, dim=16, style_dim=8, n_blocks=4, n_down=1),
        stargan.StyleEncoder(4, size, style_dim=8, num_domains=K, dim=8),
        stargan.MappingNetwork(latent_dim=4, style_dim=8, num_domains=K, hidden=16),
        stargan.Discriminator(4, size, num_domains=K, dim=8),
    )


def test_stargan_networks_pick_the_domain_head():
    G, E, F_, D = tiny_stargan()
    x, z = torch.randn(5, 4, 8, 8), torch.randn(5, 4)
    y = torch.tensor([0, 2, 1, 2, 0])
    s = E(x, y)
    assert s.shape == (5, 8) and G(x, s).shape == x.shape and D(x, y).shape == (5,)
    all_styles = E.heads(E.trunk(x).flatten(1)).view(5, 3, 8)  # every domain's head
    torch.testing.assert_close(s, all_styles[torch.arange(5), y])
    D.eval()
    all_logits = D.head(D.trunk(x)).flatten(1)
    torch.testing.assert_close(D(x, y), all_logits[torch.arange(5), y])
    for k in range(3):  # F's head k is the one used for domain k
        torch.testing.assert_close(F_(z, torch.full((5,), k)), F_.heads[k](F_.shared(z)))


def test_stargan_batched_calls_equal_separate_calls():
    # The training step concatenates inputs along the batch (e.g. D(cat[x_ref, fake_ref,
    # fake_lat])): exact only because no network has a batch-dependent layer (instance norm is per
    # sample, there is no batch norm).
    G, E, F_, D = tiny_stargan(seed=1)
    D.eval()  # in train mode spectral norm takes a power-iteration step per call
    a, b = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    ya, yb = torch.tensor([0, 1, 2]), torch.tensor([2, 2, 1])
    sa, sb = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(
        G(torch.cat([a, b]), torch.cat([sa, sb])), torch.cat([G(a, sa), G(b, sb)])
    )
    torch.testing.assert_close(
        E(torch.cat([a, b]), torch.cat([ya, yb])), torch.cat([E(a, ya), E(b, yb)])
    )
    torch.testing.assert_close(
        D(torch.cat([a, b]), torch.cat([ya, yb])), torch.cat([D(a, ya), D(b, yb)])
    )
    za, zb = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(
        F_(torch.cat([za, zb]), torch.cat([ya, yb])), torch.cat([F_(za, ya), F_(zb, yb)])
    )


def test_stargan_stats_loss_is_the_style_statistics_l1():
    # T(x) per latent: each channel's mean and (unbiased) standard deviation over the positions,
    # then its mean |x[h+1, w] - x[h, w]| and mean |x[h, w+1] - x[h, w]|; stats = mean |T(a) - T(b)|
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)

    def reference(lat):
        rows = []
        for x in lat:
            mean = [x[c].mean() for c in range(3)]
            std = [x[c].flatten().std() for c in range(3)]
            dv = [(x[c, 1:] - x[c, :-1]).abs().mean() for c in range(3)]
            dh = [(x[c, :, 1:] - x[c, :, :-1]).abs().mean() for c in range(3)]
            rows.append(torch.stack(mean + std + dv + dh))
        return torch.stack(rows).float()  # T works in float32

    torch.testing.assert_close(stargan.style_features(a), reference(a))
    torch.testing.assert_close(stargan.stats_loss(a, b), (reference(a) - reference(b)).abs().mean())
    # the look, not where things are: a mirror leaves it exactly, a brighter latent does not
    assert stargan.stats_loss(a.flip(-1), a) < 1e-6 and stargan.stats_loss(a + 0.5, a) > 0.1

    # --stats_max: T also holds each channel's largest and smallest value over the positions, of
    # extremes_of (the translation with E's style held) against the reference's
    def with_extremes(lat, of):
        ext = [[x[c].max() for c in range(3)] + [x[c].min() for c in range(3)] for x in of]
        return torch.cat([reference(lat), torch.tensor(ext).float()], 1)

    c = torch.randn(2, 3, 4, 5)
    want = (with_extremes(a, c) - with_extremes(b, b)).abs().mean()
    torch.testing.assert_close(stargan.stats_loss(a, b, extremes_of=c), want)
    # one position made the brightest by 2: the extremes move by 2, the moments by much less
    spot = a.clone()
    spot[:, :, 0, 0] = a.amax((2, 3)) + 2
    moments, both = stargan.stats_loss(spot, a), stargan.stats_loss(spot, a, extremes_of=spot)
    assert stargan.stats_loss(a.flip(-1), a, extremes_of=a.flip(-1)) < 1e-6 and both > 2 * moments


def test_stargan_f_match_loss_is_the_sliced_wasserstein_and_the_nearest_pull():
    # s_f, s_e (K domains, M styles, D). Per domain, on each direction: both projections sorted,
    # |difference|, the mean over domains, the 64 random unit directions drawn first (N(0, 1),
    # normalised) and ranks. Plus 3 times the mean over E's styles of the Euclidean distance to
    # the nearest F style of the domain, / sqrt(D). Written out with loops.
    torch.manual_seed(0)
    K, M, D = 2, 16, 10
    s_f, s_e = torch.randn(K, M, D), torch.randn(K, M, D) + 1

    def swd(directions):  # one (D, n) per domain
        total, count = 0.0, 0
        for k in range(K):
            for j in range(directions[k].shape[1]):
                u = sorted((s_f[k] @ directions[k][:, j]).tolist())
                v = sorted((s_e[k] @ directions[k][:, j]).tolist())
                total, count = total + sum(abs(a - b) for a, b in zip(u, v)), count + M
        return total / count

    torch.manual_seed(3)
    proj = torch.randn(D, 64)
    proj = proj / proj.norm(dim=0, keepdim=True)
    near = [min(float((e - f).norm()) for f in s_f[k]) for k in range(K) for e in s_e[k]]
    want = swd([proj] * K) + 3 * sum(near) / len(near) / D**0.5
    torch.manual_seed(3)
    assert float(stargan.f_match_loss(s_f, s_e)) == pytest.approx(want, rel=1e-5)
    # E's styles exactly: 0; and F's gradient flows, E's is not asked for
    assert float(stargan.f_match_loss(s_e, s_e)) < 1e-5
    s_f.requires_grad_(True)
    stargan.f_match_loss(s_f, s_e).backward()
    assert s_f.grad.abs().sum() > 0


def test_stargan_structure_loss_is_the_self_similarity_l1():
    # S[p, q] = cos(x_p - m, x_q - m) over the latent vectors x_p of a latent's positions, m their
    # mean; struct = mean |S(output) - S(source)|. Written out with loops here.
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)

    def reference(lat):
        out = torch.zeros(len(lat), 20, 20)
        for b in range(len(lat)):
            v = lat[b].reshape(3, 20)
            v = v - v.mean(1, keepdim=True)
            for p in range(20):
                for q in range(20):
                    out[b, p, q] = torch.dot(v[:, p], v[:, q]) / (v[:, p].norm() * v[:, q].norm())
        return out

    torch.testing.assert_close(stargan.self_similarity(x), reference(x))
    expect = (reference(x) - reference(y)).abs().mean()
    torch.testing.assert_close(stargan.structure_loss(x, y), expect)
    # the layout, not the values: a rescaled latent with a shift per channel keeps it exactly;
    # the same latent mirrored does not
    moved = 3 * x + torch.randn(1, 3, 1, 1)
    assert stargan.structure_loss(moved, x) < 1e-6
    assert stargan.structure_loss(x.flip(-1), x) > 0.1
    # latents over 32x32 are pooled to 32x32 first: S stays (B, 1024, 1024)
    big = torch.randn(1, 4, 64, 48)
    assert stargan.self_similarity(big).shape == (1, 1024, 1024)


def test_stargan_views_move_latents_exactly():
    # E's views: a mirror and a whole-pixel shift move pixels exactly; no move is the identity
    x = torch.randn(6, 4, 8, 8)
    eye = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).repeat(6, 1, 1)
    torch.testing.assert_close(stargan.view(x, eye), x, rtol=0, atol=1e-6)
    mirror = eye.clone()
    mirror[:, 0, 0] = -1  # samples x at -x
    torch.testing.assert_close(stargan.view(x, mirror), x.flip(-1), rtol=0, atol=1e-6)
    twice = stargan.view(stargan.view(x, mirror), mirror)
    torch.testing.assert_close(twice, x, rtol=0, atol=1e-6)
    shift = eye.clone()
    shift[:, 0, 2], shift[:, 1, 2] = 2 * 2 / 8, -1 * 2 / 8  # 2 pixels along W, -1 along H
    moved = stargan.view(x, shift)
    torch.testing.assert_close(moved[..., 1:, :6], x[..., :7, 2:], rtol=0, atol=1e-6)
    torch.testing.assert_close(moved[..., :, 6:], moved[..., :, 5:6].expand(-1, -1, -1, 2))
    # random_views: nothing asked, nothing moved; shifts are whole pixels within the bound
    torch.manual_seed(0)
    assert torch.equal(stargan.random_views(6, 0.0, 0.0, 0.0, (8, 8), "cpu"), eye)
    theta = stargan.random_views(4000, 0.5, 0.25, 0.25, (8, 16), "cpu")
    flips = (theta[:, 0, 0] < 0).float().mean()
    assert 0.45 < flips < 0.55
    scale = theta[:, 1, 1]  # 1 / zoom, zoom in [0.75, 1.25]
    assert scale.min() >= 1 / 1.25 - 1e-6 and scale.max() <= 1 / 0.75 + 1e-6
    torch.testing.assert_close(theta[:, 0, 0].abs(), scale)
    px_w, px_h = theta[:, 0, 2] * 16 / 2, theta[:, 1, 2] * 8 / 2  # in pixels
    assert set(px_w.round().tolist()) == set(range(-4, 5)) and set(px_h.round().tolist()) == {
        -2.0,
        -1.0,
        0.0,
        1.0,
        2.0,
    }
    torch.testing.assert_close(px_w, px_w.round())


def ada(p, target=None, interval=4, kimg=0.064, batch=16, p_max=1.0):
    cfg = dict(ada_target=target, ada_p=p, ada_interval=interval, ada_kimg=kimg, ada_p_max=p_max)
    return stargan.AdaptiveAugment({**cfg, "batch_size": batch, "seed": 0}, torch.device("cpu"))


def test_stargan_ada_ops_are_exact_and_pass_gradients():
    x = torch.randn(5, 4, 8, 8)
    ident = torch.arange(8).expand(5, 8)
    ones = torch.ones(5, 1, 8, 8)
    # no op, or p = 0: x itself, bit for bit
    assert torch.equal(stargan.augment(x, (ident, ident, ones)), x)
    assert torch.equal(stargan.augment(x, ada(0.0).draw(5, (8, 8))), x)
    # the mirror, twice: the identity; a translation by k: the border repeated
    mirror = (ident, 7 - ident, ones)
    assert torch.equal(stargan.augment(x, mirror), x.flip(-1))
    assert torch.equal(stargan.augment(stargan.augment(x, mirror), mirror), x)
    right2 = (ident, (ident - 2).clamp(0, 7), ones)  # content moves 2 pixels right
    moved = stargan.augment(x, right2)
    assert torch.equal(moved[..., 2:], x[..., :6]) and torch.equal(moved[..., 1], x[..., 0])
    # p = 1: every latent mirrored (shift aside) and cut out: a square of half the side, clipped
    rows, cols, mask = ada(1.0).draw(2000, (8, 8))
    assert (cols[:, 0] >= cols[:, -1]).all()  # read right to left
    holes = (mask == 0).flatten(1).sum(1)
    assert holes.min() >= 1 and holes.max() == 16
    moves = (cols[:, 0] - 7).abs()  # the mirrored first column reads 7, or 7 +- 1 moved
    assert set(moves.tolist()) <= {0, 1} and (rows[:, 0] == 1).any()
    # p = 0.5: each op on about half the latents, each independently
    rows, cols, mask = ada(0.5).draw(4000, (8, 8))
    assert 0.45 < (cols[:, 0] > cols[:, -1]).float().mean() < 0.55
    assert 0.45 < (mask == 0).flatten(1).any(1).float().mean() < 0.55
    # gradients flow back through the pipe: through a mirror, the mirrored upstream gradient;
    # nothing through a cutout
    x.requires_grad_(True)
    w = torch.randn(5, 4, 8, 8)
    cut = torch.ones(5, 1, 8, 8)
    cut[..., :4, :4] = 0
    (stargan.augment(x, (ident, 7 - ident, cut)) * w).sum().backward()
    assert torch.equal(x.grad, (w * cut).flip(-1))


def test_stargan_ada_p_moves_by_the_sign_of_r_t_minus_the_target():
    # StyleGAN2-ADA: every interval steps p += sign(r_t - target) * batch * interval / (kimg
    # 1000), r_t the mean sign(D(x_ref)) over those steps; clamped to [0, ada_p_max]
    a = ada(None, target=0.6, interval=4, kimg=0.064, batch=16)  # steps of 16 * 4 / 64 = 1
    a.speed = 0.25  # smaller steps for the test
    for step, r in enumerate([1.0, 1.0, 0.2, 0.6], 1):  # r_t = 0.7 > 0.6: up
        a.step(torch.tensor(r), step)
    assert float(a.p) == 0.25 and float(a.rt_sum) == 0
    for step in range(5, 9):  # r_t = 0.5 < 0.6: down
        a.step(torch.tensor(0.5), step)
    assert float(a.p) == 0.0
    for step in range(9, 13):  # no lower than 0
        a.step(torch.tensor(-1.0), step)
    assert float(a.p) == 0.0
    for step in range(13, 13 + 4 * 6):  # no higher than 1
        a.step(torch.tensor(1.0), step)
    assert float(a.p) == 1.0
    capped = ada(None, target=0.6, p_max=0.4)  # and no higher than the ceiling
    for step in range(1, 4 * 3):
        capped.step(torch.tensor(1.0), step)
    assert float(capped.p) == pytest.approx(0.4)
    assert ada(None, target=0.6, kimg=500).speed == 16 * 4 / 500e3
    fixed = ada(0.3)  # --ada_p: p stays
    for step in range(1, 9):
        fixed.step(torch.tensor(1.0), step)
    assert float(fixed.p) == pytest.approx(0.3)


def test_stargan_generator_output_is_linear():
    # No tanh at G's output: SD latents are unbounded. Shifting the last conv's bias by 5 shifts
    # every output by exactly 5, past [-1, 1]; a squashing output would not.
    G = tiny_stargan()[0]
    x, s = torch.randn(2, 4, 8, 8), torch.randn(2, 8)
    with torch.no_grad():
        before = G(x, s)
        G.to_latent[-1].bias += 5.0
        after = G(x, s)
    torch.testing.assert_close(after, before + 5.0)
    assert after.max() > 5


def test_stargan_styles_depend_on_z_at_initialisation():
    # He init (StarGAN v2's): F's styles of different z, and G's outputs for them, differ by about
    # as much as the styles of different references. PyTorch's default init shrinks F's output
    # through its 6 Linear + ReLU layers until one domain gets nearly one style: G is blind to z.
    torch.manual_seed(0)
    G = stargan.Generator(4, dim=32, style_dim=16, n_blocks=4, n_down=1)
    E = stargan.StyleEncoder(4, 8, style_dim=16, num_domains=3, dim=16)
    F_ = stargan.MappingNetwork(latent_dim=8, style_dim=16, num_domains=3, hidden=64)
    x, y = torch.randn(32, 4, 8, 8), torch.full((32,), 1)
    with torch.no_grad():
        s1, s2 = F_(torch.randn(32, 8), y), F_(torch.randn(32, 8), y)
        e1, e2 = E(torch.randn(32, 4, 8, 8), y), E(torch.randn(32, 4, 8, 8), y)
        over_z = (G(x, s1) - G(x, s2)).abs().mean()
        over_refs = (G(x, e1) - G(x, e2)).abs().mean()
    assert (s1 - s2).abs().mean() > 0.3 * (e1 - e2).abs().mean()
    assert over_z > 0.3 * over_refs and over_z > 0.1
    F_.apply(lambda m: m.reset_parameters() if isinstance(m, torch.nn.Linear) else None)
    with torch.no_grad():  # PyTorch's default init
        d1, d2 = F_(torch.randn(32, 8), y), F_(torch.randn(32, 8), y)
    assert (d1 - d2).abs().mean() < 0.05 * (s1 - s2).abs().mean()


def test_stargan_r1_on_its_discriminator():
    # R1 through the real D (spectral norm, domain heads), against central differences of D's
    # logits in x; and its gradient in one of D's weights, against central differences of R1
    D = tiny_stargan()[3].eval()  # eval: spectral norm's power iteration holds still
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    y = torch.tensor([0, 2])
    r1 = stargan.r1_penalty(D(x, y), x)
    h, grad = 1e-6, torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros(x.numel())
        e[i] = h
        e = e.view_as(x)
        grad.view(-1)[i] = (D(x + e, y).sum() - D(x - e, y).sum()) / (2 * h)
    assert r1.item() == pytest.approx(grad.pow(2).flatten(1).sum(1).mean().item(), rel=1e-6)
    w = D.head.parametrizations.weight.original
    (g_w,) = torch.autograd.grad(r1, w)

    def r1_at(delta):
        with torch.no_grad():
            w[0, 0, 0, 0] += delta
        xx = x.detach().requires_grad_(True)
        out = stargan.r1_penalty(D(xx, y), xx).item()
        with torch.no_grad():
            w[0, 0, 0, 0] -= delta
        return out

    fd = (r1_at(1e-5) - r1_at(-1e-5)) / 2e-5
    assert g_w[0, 0, 0, 0].item() == pytest.approx(fd, rel=1e-4, abs=1e-9)


# -----------------------------------------------------------------------------
# evaluation metrics


def random_cov(d, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank or d, generator=g).numpy()
    return a @ a.T / (rank or d)


def frechet_reference(mu1, s1, mu2, s2):
    """The usual formula: tr sqrt(s1 s2) from the eigenvalues of s1 s2, as scipy's sqrtm gives."""
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt


def test_frechet_distance():
    fd = stargan.frechet_distance
    mu, s = np.arange(5.0), random_cov(5, 0)
    assert abs(fd(mu, s, mu, s)) < 1e-9  # identical Gaussians
    # diagonal Gaussians: ||mu1 - mu2||^2 + sum (sigma1 - sigma2)^2
    m1, m2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expect = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert fd(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expect, rel=1e-12)
    assert fd([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9 + (2 - 1) ** 2, rel=1e-12)
    s1, s2, mu2 = random_cov(8, 1), random_cov(8, 2), np.linspace(-1, 1, 8)
    ref = frechet_reference(np.zeros(8), s1, mu2, s2)
    assert fd(np.zeros(8), s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    assert fd(mu2, s2, np.zeros(8), s1) == pytest.approx(ref, rel=1e-9)  # symmetric
    # rank-deficient covariances (fewer samples than features): still the same value
    s3, s4 = random_cov(8, 3, rank=2), random_cov(8, 4, rank=3)
    ref = frechet_reference(np.zeros(8), s3, mu2, s4)
    assert fd(np.zeros(8), s3, mu2, s4) == pytest.approx(ref, rel=1e-6)


def mmd2_unbiased_loops(x, y):
    """The unbiased MMD^2 of Binkowski et al. with k(a, b) = (a.b / d + 1)^3, written with loops."""
    d, m = len(x[0]), len(x)

    def k(a, b):
        return (sum(p * q for p, q in zip(a, b)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 3)), rng.normal(1.0, 1.0, size=(12, 3))
    # one subset holding every sample: exactly the unbiased MMD^2
    ref = mmd2_unbiased_loops(x.tolist(), y.tolist())
    assert mnist.kid(x, y, n_subsets=1, subset_size=12) == pytest.approx(ref, rel=1e-10)
    # several subsets: the mean of the loop formula over the same random subsets
    a, b = rng.normal(size=(30, 4)), rng.normal(0.5, 1.0, size=(30, 4))
    pick = np.random.default_rng(7)
    subsets = [
        (pick.choice(30, 8, replace=False), pick.choice(30, 8, replace=False)) for _ in range(5)
    ]
    ref = np.mean([mmd2_unbiased_loops(a[i].tolist(), b[j].tolist()) for i, j in subsets])
    assert mnist.kid(a, b, n_subsets=5, subset_size=8, seed=7) == pytest.approx(ref, rel=1e-10)


def test_classifier_score():
    one_hot = np.eye(10)[np.arange(1000) % 10]  # confident, every class equally often
    assert mnist.classifier_score(one_hot) == pytest.approx(10, rel=1e-6)
    assert mnist.classifier_score(np.eye(10)[np.zeros(1000, int)]) == pytest.approx(1, rel=1e-6)
    assert mnist.classifier_score(np.full((100, 10), 0.1)) == pytest.approx(1, rel=1e-9)
    half = np.eye(10)[np.arange(1000) % 5]  # confident, 5 classes
    assert mnist.classifier_score(half) == pytest.approx(5, rel=1e-6)
    p = np.array([[0.7, 0.3], [0.2, 0.8]])  # exp(mean KL(p(y|x) || p(y))), written out
    py = p.mean(0)
    kl = [(row * np.log(row / py)).sum() for row in p]
    assert mnist.classifier_score(p) == pytest.approx(np.exp(np.mean(kl)), rel=1e-9)


def prdc_reference(real, fake, k):
    """Naeem et al.'s definitions, brute force (as their compute_prdc writes them, in numpy)."""
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    d_ff = np.linalg.norm(fake[:, None] - fake[None], axis=-1)
    d_rf = np.linalg.norm(real[:, None] - fake[None], axis=-1)
    r_real = np.sort(d_rr, axis=1)[:, k]  # the k-th nearest other point (index 0 is itself)
    r_fake = np.sort(d_ff, axis=1)[:, k]
    return {
        "precision": (d_rf < r_real[:, None]).any(axis=0).mean(),
        "recall": (d_rf < r_fake[None, :]).any(axis=1).mean(),
        "density": (1 / k) * (d_rf < r_real[:, None]).sum(axis=0).mean(),
        "coverage": (d_rf.min(axis=1) < r_real).mean(),
    }


@pytest.mark.parametrize(
    "script", [mnist, stargan], ids=["train_mnist_gan", "train_latent_stargan"]
)
def test_prdc_against_brute_force(script):
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(80, 6)), rng.normal(0.4, 1.2, size=(60, 6))
    ref = prdc_reference(real, fake, 5)
    got = script.prdc(torch.from_numpy(real), torch.from_numpy(fake), k=5, chunk=7)  # chunks
    for key, v in ref.items():
        assert got[key] == pytest.approx(v, abs=1e-12), key
    assert 0 < got["precision"] < 1 and 0 < got["coverage"] < 1  # a case with something to count


def test_prdc_known_cases():
    rng = np.random.default_rng(1)
    real = torch.from_numpy(rng.normal(size=(50, 4)))
    same = mnist.prdc(real, real.clone(), k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    # density: each real's ball holds itself and k - 1 others, the k-th on its edge: density 1,
    # up to how cdist rounds the distances that tie there
    assert same["density"] == pytest.approx(1.0, abs=0.02)
    far = mnist.prdc(real, real + 100.0, k=5)  # disjoint sets
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    one = mnist.prdc(
        real, real[:1].repeat(50, 1) + 1e-3 * torch.randn(50, 4, dtype=real.dtype), k=5
    )
    assert one["coverage"] <= 0.2 and one["precision"] == 1.0  # collapsed: precise, not covering


# -----------------------------------------------------------------------------
# copies: a definition that two scripts share is written identically in both, found by machine


SCRIPTS = ["train_mnist_gan.py", "train_latent_stargan.py", "encode_latents.py", "plot_losses.py"]
OWN = {
    "main",
    "build_parser",
    "parse_config",
    "build_models",
    "train_step",
}  # every script's own entry points, models and training step, by the house's names


def top_level_definitions(path):
    """{name: source} of every top-level function and class of a script, decorators included."""
    src = open(os.path.join(HERE, path)).read()
    lines = src.splitlines()
    defs = {}
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            defs[node.name] = "\n".join(lines[start - 1 : node.end_lineno])
    return defs


def shared_definitions():
    """{name: {script: source}} for every name defined at the top of two or more scripts."""
    by_name = {}
    for script in SCRIPTS:
        for name, src in top_level_definitions(script).items():
            by_name.setdefault(name, {})[script] = src
    return {n: v for n, v in by_name.items() if len(v) > 1 and n not in OWN}


def test_shared_definitions_are_identical_copies():
    shared = shared_definitions()
    assert {"die", "ArgParser", "r1_penalty", "save_grid", "Meter", "read_idx", "load_vae"} <= set(
        shared
    )
    for name, copies in sorted(shared.items()):
        first = next(iter(copies.values()))
        differ = [s for s, src in copies.items() if src != first]
        assert not differ, f"{name} differs between {', '.join(copies)}: keep the copies identical"


def test_the_copy_check_finds_a_changed_copy(tmp_path, monkeypatch):
    # The check above can fail: a copy edited in one script only is caught
    for script in SCRIPTS:
        (tmp_path / script).write_text(open(os.path.join(HERE, script)).read())
    stargan_src = (tmp_path / "train_latent_stargan.py").read_text()
    edited = stargan_src.replace('print(f"{SCRIPT}: error: {msg}", file=sys.stderr)',
                                 'print(f"{SCRIPT}: {msg}", file=sys.stderr)')  # fmt: skip
    assert edited != stargan_src
    (tmp_path / "train_latent_stargan.py").write_text(edited)
    monkeypatch.setattr(sys.modules[__name__], "HERE", str(tmp_path))
    with pytest.raises(AssertionError, match="die differs"):
        test_shared_definitions_are_identical_copies()
