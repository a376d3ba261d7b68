"""The estimators against the paper's formulas, on an analytic stand-in noise predictor (no diffusers)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from lods.cameras import sample_cameras
from lods.guidance import (
    METHODS,
    GuidanceConfig,
    TimestepSchedule,
    annealed_cfg,
    cfg_combine,
    cfg_rescale,
    dds_direction,
    denoising_loss,
    detached_target_loss,
    make_estimator,
    sds_direction,
    sds_norm_direction,
    sds_ref_direction,
    timestep_weight,
    vsd_direction,
)
from lods.priors.base import DiffusionPrior, PriorDefaults


class StandInPrior:
    """A pixel-space epsilon predictor: eps = sqrt(ab) * M z_t + tanh(mean(emb) P) (+ LoRA and camera terms).

    It honours the DiffusionPrior protocol, including LoRA adapters (a low-rank change of M) that are
    off outside ``lora_scale`` and an optional camera term (flattened c2w times a matrix, zero at start).
    """

    def __init__(self, channels: int = 3, size: int = 8, width: int = 6, length: int = 3):
        g = torch.Generator().manual_seed(0)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.num_train_timesteps = 1000
        self.image_size = size
        self.latent_shape = (channels, size, size)
        self.negative_prompt = ""
        self.defaults = PriorDefaults()
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self._ab = torch.cumprod(1 - betas, 0).float()
        self.mix = torch.randn(channels, channels, generator=g) * 0.3 + torch.eye(channels)
        self.proj = torch.randn(width, channels, generator=g)
        self.width, self.length = width, length
        self.adapters: dict[str, dict[str, nn.Parameter]] = {}
        self.active: tuple[str, float] | None = None

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._ab

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        embs = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(p)))
            embs.append(torch.randn(1, self.length, self.width, generator=g))
        return torch.cat(embs)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return ((z + 1) / 2).clamp(0, 1)

    def add_noise(self, z, noise, t):
        ab = self._ab[t].view(-1, 1, 1, 1)
        return ab.sqrt() * z + (1 - ab).sqrt() * noise

    def predict_noise(self, z_t, t, text_emb, class_labels=None):
        mix = self.mix
        bias = torch.tanh(text_emb.float().mean(1) @ self.proj)
        if self.active is not None:
            name, scale = self.active
            a = self.adapters[name]
            mix = mix + scale * a["down"] @ a["up"]
            if "camera" in a and class_labels is not None:
                bias = bias + scale * class_labels @ a["camera"]
        ab = self._ab[t].view(-1, 1, 1, 1)
        return ab.sqrt() * torch.einsum("bchw,cd->bdhw", z_t.float(), mix) + bias[:, :, None, None]

    def add_lora(self, name, rank=4, alpha=None, camera_conditioning=False):
        c = self.latent_shape[0]
        a = {"down": nn.Parameter(torch.randn(c, rank) * 0.5), "up": nn.Parameter(torch.zeros(rank, c))}
        if camera_conditioning:
            a["camera"] = nn.Parameter(torch.zeros(16, c))
        self.adapters[name] = a
        return list(a.values())

    def remove_lora(self, name):
        del self.adapters[name]

    @contextmanager
    def lora_scale(self, name, scale=1.0):
        previous = self.active
        self.active = None if name is None or scale == 0 else (name, scale)
        try:
            yield
        finally:
            self.active = previous


@pytest.fixture
def prior() -> StandInPrior:
    return StandInPrior()


def embs(prior):
    return prior.encode_text(["a red cube"]), prior.encode_text([""])


def latents(prior, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, *prior.latent_shape, generator=g) * 2 - 1).requires_grad_(True)


def run_step(est, prior, z, cfg, step=0, seed=7, cameras=None):
    text, null = embs(prior)
    torch.manual_seed(seed)
    return est.step(z, text, null, cfg, step, cameras)


def test_stand_in_follows_protocol(prior):
    assert isinstance(prior, DiffusionPrior)


# ----------------------------------------------------------------------------- pure functions


def test_cfg_combine_is_eq2():
    eps_c, eps_u = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for w in (1.0, 7.5, 100.0):
        torch.testing.assert_close(cfg_combine(eps_c, eps_u, w), w * eps_c + (1 - w) * eps_u)
        torch.testing.assert_close(cfg_combine(eps_c, eps_u, w), eps_u + w * (eps_c - eps_u))
    assert torch.equal(cfg_combine(eps_c, eps_u, 1.0), eps_c)


def test_sds_norm_times_w_is_sds():
    eps_c, eps_u, noise = torch.randn(3, 2, 3, 4, 4)
    for w in (1.0, 3.0, 100.0, 1000.0):
        norm = sds_norm_direction(eps_c, eps_u, noise, w)
        torch.testing.assert_close(w * norm, sds_direction(cfg_combine(eps_c, eps_u, w), noise), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(norm, eps_c + (1 - w) * eps_u / w - noise / w)


def test_sds_norm_infinite_weight_is_the_limit():
    eps_c, eps_u, noise = torch.randn(3, 2, 3, 4, 4)
    limit = sds_norm_direction(eps_c, eps_u, noise, math.inf)
    torch.testing.assert_close(limit, eps_c - eps_u)
    torch.testing.assert_close(sds_norm_direction(eps_c, eps_u, noise, 1e7), limit, atol=1e-5, rtol=0)


def test_other_directions_match_their_equations():
    a, b, noise = torch.randn(3, 2, 3, 4, 4)
    torch.testing.assert_close(sds_ref_direction(a, noise), a - noise)
    torch.testing.assert_close(dds_direction(a, b), a - b)
    torch.testing.assert_close(vsd_direction(a, b), a - b)
    torch.testing.assert_close(denoising_loss(a, noise), ((a - noise) ** 2).mean())


def test_detached_loss_gradient_is_the_direction():
    z = torch.randn(4, 3, 5, 5, requires_grad=True)
    grad = torch.randn(4, 3, 5, 5)
    loss = detached_target_loss(z, grad)
    loss.backward()
    torch.testing.assert_close(z.grad * 4, grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, 0.5 * (grad**2).sum() / 4)


def test_weightings():
    ab = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(timestep_weight(ab, "sds"), 1 - ab)
    torch.testing.assert_close(timestep_weight(ab, "uniform"), torch.ones(3))
    torch.testing.assert_close(timestep_weight(ab, "fantasia3d"), ab.sqrt() * (1 - ab))
    with pytest.raises(ValueError, match="fantasia3d"):
        timestep_weight(ab, "nope")
    with pytest.raises(ValueError):
        GuidanceConfig(weighting="nope")


def test_annealed_cfg_goes_linearly_from_w0_to_w1():
    assert annealed_cfg(100, 10, 0, 100) == 100
    assert annealed_cfg(100, 10, 50, 100) == pytest.approx(55)
    assert annealed_cfg(100, 10, 100, 100) == 10
    assert annealed_cfg(100, 10, 500, 100) == 10


def test_timestep_schedule_bounds_and_annealing():
    s = TimestepSchedule(min_frac=0.02, max_frac=0.98, anneal="step", anneal_to=0.5, anneal_step=500)
    assert s.bounds(0, 1000) == (20, 980)
    assert s.bounds(499, 1000) == (20, 980)
    assert s.bounds(500, 1000) == (20, 500)
    lin = TimestepSchedule(anneal="linear", anneal_to=0.5, anneal_step=100)
    assert lin.bounds(50, 1000)[1] == 740
    assert lin.bounds(1000, 1000)[1] == 500
    torch.manual_seed(0)
    t = s.sample(600, 4000, 1000, torch.device("cpu"))
    assert t.min() >= 20 and t.max() <= 500 and t.max() > 450
    with pytest.raises(ValueError):
        TimestepSchedule(min_frac=0.9, max_frac=0.5)
    with pytest.raises(ValueError):
        TimestepSchedule(anneal="cosine")


# ----------------------------------------------------------------------------- estimators


def test_sds_norm_estimator_times_w_equals_sds(prior):
    z = latents(prior)
    for w in (7.5, 100.0):
        sds = run_step(make_estimator("sds", prior), prior, z, w)
        norm = run_step(make_estimator("sds-norm", prior), prior, z, w)
        torch.testing.assert_close(w * norm.grad, sds.grad, rtol=1e-5, atol=1e-5)
        assert sds.stats["t"] == norm.stats["t"]


def test_sds_ref_equals_sds_at_w_one(prior):
    z = latents(prior)
    sds = run_step(make_estimator("sds", prior), prior, z, 1.0)
    ref = run_step(make_estimator("sds-ref", prior), prior, z, 1.0)
    torch.testing.assert_close(ref.grad, sds.grad)
    assert ref.stats["unet_forward"] == 1 and sds.stats["unet_forward"] == 2


def test_step_grad_is_weighted_direction_and_z_gets_it(prior):
    z = latents(prior)
    est = make_estimator("sds", prior, {"weighting": "fantasia3d"})
    text, null = embs(prior)
    torch.manual_seed(3)
    out = est.step(z, text, null, 10.0, 0)
    torch.manual_seed(3)
    t = est.config.schedule.sample(0, 2, 1000, z.device)
    noise = torch.randn(z.shape)
    z_t = prior.add_noise(z.detach(), noise, t)
    eps_c = prior.predict_noise(z_t, t, text.expand(2, -1, -1))
    eps_u = prior.predict_noise(z_t, t, null.expand(2, -1, -1))
    ab = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = ab.sqrt() * (1 - ab) * (eps_u + 10.0 * (eps_c - eps_u) - noise)
    torch.testing.assert_close(out.grad, expected, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    torch.testing.assert_close(z.grad * 2, out.grad, rtol=1e-5, atol=1e-6)
    assert out.stats["cfg"] == 10.0 and out.stats["grad_norm"] > 0


def test_alpha_update_is_gradient_of_denoising_loss_and_ignores_w(prior):
    z = latents(prior)
    text, null = embs(prior)
    grads = []
    for w in (5.0, 1000.0):
        est = make_estimator("lods-embed", prior, {"lr": 1e-3})
        run_step(est, prior, z, w)
        alpha0 = est.alpha.detach().clone()
        torch.manual_seed(11)
        info = est.update(z.detach(), text, null)
        grads.append(est.alpha.grad.clone())
        # the same draw, by hand: t uniform in [0, T), eps, z_t from detached z
        torch.manual_seed(11)
        t = torch.randint(0, 1000, (2,))
        noise = torch.randn(z.shape)
        a = alpha0.clone().requires_grad_(True)
        eps = prior.predict_noise(prior.add_noise(z.detach(), noise, t), t, a.expand(2, -1, -1))
        loss = ((eps - noise) ** 2).mean()
        (expected,) = torch.autograd.grad(loss, a)
        torch.testing.assert_close(est.alpha.grad, expected)
        assert info["update_loss"] == pytest.approx(loss.item())
        assert not torch.equal(est.alpha.detach(), alpha0)
        assert info["alpha_drift"] > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_alpha_starts_from_null_embedding_and_is_frozen_in_theta_step(prior):
    z = latents(prior)
    est = make_estimator("lods-embed", prior)
    out = run_step(est, prior, z, 100.0)
    torch.testing.assert_close(est.alpha.detach(), embs(prior)[1])
    out.loss.backward()
    assert est.alpha.grad is None and not est.alpha.requires_grad


def test_frozen_alpha_makes_lods_embed_equal_sds_norm(prior):
    z = latents(prior)
    text, null = embs(prior)
    lods = make_estimator("lods-embed", prior, {"lr": 0.0})
    norm = make_estimator("sds-norm", prior)
    for step in range(3):
        a = run_step(lods, prior, z, 50.0, step, seed=step)
        b = run_step(norm, prior, z, 50.0, step, seed=step)
        assert torch.equal(a.grad, b.grad)
        lods.update(z.detach(), text, null)
    lods.set_lr(0.05)
    lods.update(z.detach(), text, null)
    a = run_step(lods, prior, z, 50.0, 3, seed=3)
    b = run_step(norm, prior, z, 50.0, 3, seed=3)
    assert not torch.allclose(a.grad, b.grad)


def test_set_lr_changes_the_optimizer(prior):
    est = make_estimator("lods-lora", prior, {"lr": 1e-3})
    assert est.optimizer.param_groups[0]["lr"] == 1e-3
    est.set_lr(2e-4)
    assert all(g["lr"] == 2e-4 for g in est.optimizer.param_groups)


def test_infinite_cfg(prior):
    z = latents(prior)
    for method in ("sds-norm", "lods-embed", "lods-lora"):
        out = run_step(make_estimator(method, prior), prior, z, math.inf)
        assert torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0
    for method in ("sds", "cfg-anneal", "cfg-rescale", "ism", "vsd", "dds"):
        est = make_estimator(method, prior)
        if method == "dds":
            est.set_source(z, embs(prior)[0])
        with pytest.raises(ValueError, match="inf"):
            run_step(est, prior, z, math.inf)


def test_lods_lora_null_branch_uses_lora_at_configured_scale(prior):
    z = latents(prior)
    text, null = embs(prior)
    est = make_estimator("lods-lora", prior, {"lr": 0.05, "lora_scale": 0.5})
    est.update(z.detach(), text, null)
    assert prior.active is None
    torch.manual_seed(5)
    out = est.step(z, text, null, 20.0, 0)
    torch.manual_seed(5)
    t = est.config.schedule.sample(0, 2, 1000, z.device)
    noise = torch.randn(z.shape)
    z_t = prior.add_noise(z.detach(), noise, t)
    eps_c = prior.predict_noise(z_t, t, text.expand(2, -1, -1))
    with prior.lora_scale(est.adapter, 0.5):
        eps_psi = prior.predict_noise(z_t, t, null.expand(2, -1, -1))
    with prior.lora_scale(est.adapter, 1.0):
        assert not torch.allclose(prior.predict_noise(z_t, t, null.expand(2, -1, -1)), eps_psi)
    w_t = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1)
    torch.testing.assert_close(out.grad, w_t * sds_norm_direction(eps_c, eps_psi, noise, 20.0))


@pytest.mark.parametrize("scale", [0.5, 0.25])
def test_lora_update_is_gradient_of_eq10_at_the_scale_eq9_applies(prior, scale):
    """Eqs. 9 and 10 use one psi: the update trains it at the scale the theta step applies it at (the
    official release's lora_weight, 0.5), not at full scale."""
    z = latents(prior)
    text, null = embs(prior)
    est = make_estimator("lods-lora", prior, {"lr": 1e-3, "lora_scale": scale})
    before = [p.detach().clone() for p in est.params]
    torch.manual_seed(9)
    est.update(z.detach(), text, null)
    torch.manual_seed(9)
    t = torch.randint(0, 1000, (2,))
    noise = torch.randn(z.shape)
    params = [p.clone().requires_grad_(True) for p in before]
    mix = prior.mix + scale * params[0] @ params[1]
    z_t = prior.add_noise(z.detach(), noise, t)
    ab = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = ab.sqrt() * torch.einsum("bchw,cd->bdhw", z_t, mix) + torch.tanh(null.mean(1) @ prior.proj)[:, :, None, None]
    expected = torch.autograd.grad(((eps - noise) ** 2).mean(), params)
    for p, g in zip(est.params, expected):
        torch.testing.assert_close(p.grad, g)
    assert not torch.equal(est.params[1].detach(), before[1])


def test_unet_pass_counts_match_section_3_7(prior):
    z = latents(prior)
    text, null = embs(prior)

    def total(method, **cfg):
        est = make_estimator(method, prior, cfg)
        if method == "dds":
            est.set_source(z, text)
        s = run_step(est, prior, z, 10.0).stats
        u = est.update(z.detach(), text, null) or {"unet_forward": 0, "unet_backward": 0}
        return s["unet_forward"] + u["unet_forward"], s["unet_backward"] + u["unet_backward"]

    sds = total("sds")
    assert sds == (2, 0)
    assert total("sds-ref") == (1, 0)
    assert total("lods-embed") == (sds[0] + 1, sds[1] + 1)
    assert total("lods-lora") == (sds[0] + 1, sds[1] + 1)
    assert total("lods-embed", merge_update=True) == (sds[0], sds[1] + 1)
    assert total("lods-lora", merge_update=True) == (sds[0], sds[1] + 1)
    vsd = total("vsd")
    assert sum(vsd) > sum(total("lods-embed"))
    assert total("dds") == (4, 0)


def test_merged_update_trains_alpha_on_the_theta_step_draw(prior):
    z = latents(prior)
    text, null = embs(prior)
    est = make_estimator("lods-embed", prior, {"merge_update": True, "lr": 1e-3})
    with pytest.raises(RuntimeError):
        est.update(z.detach(), text, null)
    plain = make_estimator("sds-norm", prior)
    a = run_step(est, prior, z, 30.0, seed=4)
    b = run_step(plain, prior, z, 30.0, seed=4)
    torch.testing.assert_close(a.grad, b.grad)
    alpha0 = est.alpha.detach().clone()
    est.update(z.detach(), text, null)
    torch.manual_seed(4)
    t = est.config.schedule.sample(0, 2, 1000, z.device)
    noise = torch.randn(z.shape)
    alpha = alpha0.clone().requires_grad_(True)
    eps = prior.predict_noise(prior.add_noise(z.detach(), noise, t), t, alpha.expand(2, -1, -1))
    (expected,) = torch.autograd.grad(((eps - noise) ** 2).mean(), alpha)
    torch.testing.assert_close(est.alpha.grad, expected)


def test_lods_lora_merged_and_separate_updates_train_psi_alike(prior):
    """Section 3.7's merged update and the separate one train the same psi at the same scale: given the
    same t and noise, their gradients agree."""
    z = latents(prior)
    text, null = embs(prior)
    merged = make_estimator("lods-lora", prior, {"merge_update": True, "lr": 1e-3})
    separate = make_estimator("lods-lora", prior, {"lr": 1e-3})
    with torch.no_grad():
        for a, b in zip(merged.params, separate.params):
            b.copy_(a)
    run_step(merged, prior, z, 30.0, seed=4)
    merged.update(z.detach(), text, null)
    torch.manual_seed(4)
    t = separate.config.schedule.sample(0, 2, 1000, z.device)
    noise = torch.randn(z.shape)
    separate._noisy_uniform = lambda z_: (t, noise, prior.add_noise(z_.float(), noise, t))
    separate.update(z.detach(), text, null)
    for a, b in zip(merged.params, separate.params):
        torch.testing.assert_close(a.grad, b.grad)
    assert any(p.grad.abs().sum() > 0 for p in merged.params)


def test_fresh_vsd_is_lods_at_infinite_cfg_scaled(prior):
    """Section 3.6: VSD's initial state equals LODS with an infinite CFG weight (up to the factor w - 1)."""
    z = latents(prior)
    cams = sample_cameras(2, 8)
    vsd = run_step(make_estimator("vsd", prior), prior, z, 7.5, cameras=cams)
    lods = run_step(make_estimator("lods-lora", prior), prior, z, math.inf)
    torch.testing.assert_close(vsd.grad, 6.5 * lods.grad, rtol=1e-5, atol=1e-6)


def test_vsd_camera_dropout(prior):
    z = latents(prior)
    text, null = embs(prior)
    cams = sample_cameras(2, 8)
    for dropout, moves in ((1.0, False), (0.0, True)):
        est = make_estimator("vsd", prior, {"camera_dropout": dropout})
        est.update(z.detach(), text, null, cams)
        camera = prior.adapters[est.adapter]["camera"]
        assert bool(camera.grad.abs().sum() > 0) == moves


def test_vsd_lora_is_trained_on_the_text_condition_with_cameras(prior):
    z = latents(prior)
    text, null = embs(prior)
    cams = sample_cameras(2, 8)
    est = make_estimator("vsd", prior, {"lr": 0.05, "camera_dropout": 0.0})
    for _ in range(3):
        est.update(z.detach(), text, null, cams)
    a = run_step(est, prior, z, 7.5, cameras=cams)
    b = run_step(est, prior, z, 7.5, cameras=None)
    assert not torch.allclose(a.grad, b.grad)


def test_cfg_anneal_uses_the_annealed_weight(prior):
    z = latents(prior)
    est = make_estimator("cfg-anneal", prior, {"cfg_end": 10.0, "anneal_steps": 100})
    sds = make_estimator("sds", prior)
    for step, w in ((0, 100.0), (50, 55.0), (200, 10.0)):
        a = run_step(est, prior, z, 100.0, step)
        b = run_step(sds, prior, z, w, step)
        assert a.stats["cfg"] == pytest.approx(w)
        torch.testing.assert_close(a.grad, b.grad)


def test_cfg_rescale_follows_lin_et_al_eqs_15_16():
    g = torch.Generator().manual_seed(2)
    cond = torch.randn(3, 4, 5, 5, generator=g)
    guided = 3 * torch.randn(3, 4, 5, 5, generator=g) + 1
    torch.testing.assert_close(cfg_rescale(guided, cond, 0.0), guided)
    for phi in (0.5, 0.7, 1.0):
        out = cfg_rescale(guided, cond, phi)
        s_c, s_g, s_o = (x.flatten(1).std(1) for x in (cond, guided, out))
        torch.testing.assert_close(s_o, phi * s_c + (1 - phi) * s_g, rtol=1e-5, atol=1e-6)  # per view
        ratio = out.flatten(1) / guided.flatten(1)  # a positive multiple of the guided prediction, view by view
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
        assert (ratio > 0).all()


def _x0(z_t, eps, ab):
    return (z_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def test_cfg_rescale_estimator_rescales_the_guided_clean_estimate(prior):
    z = latents(prior)
    text, null = embs(prior)
    est = make_estimator("cfg-rescale", prior, {"rescale_phi": 0.7})
    out = run_step(est, prior, z, 50.0, seed=3)
    torch.manual_seed(3)
    t = est.config.schedule.sample(0, 2, 1000, z.device)
    noise = torch.randn(z.shape)
    z_t = prior.add_noise(z.detach(), noise, t)
    ab = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps_c = prior.predict_noise(z_t, t, text.expand(2, -1, -1))
    eps_u = prior.predict_noise(z_t, t, null.expand(2, -1, -1))
    x_cfg, x_c = _x0(z_t, eps_u + 50 * (eps_c - eps_u), ab), _x0(z_t, eps_c, ab)
    x = 0.7 * x_cfg * x_c.flatten(1).std(1).view(-1, 1, 1, 1) / x_cfg.flatten(1).std(1).view(-1, 1, 1, 1) \
        + 0.3 * x_cfg
    eps = (z_t - ab.sqrt() * x) / (1 - ab).sqrt()
    torch.testing.assert_close(out.grad, (1 - ab) * (eps - noise), rtol=1e-4, atol=1e-5)
    plain = run_step(make_estimator("cfg-rescale", prior, {"rescale_phi": 0.0}), prior, z, 50.0, seed=3)
    sds = run_step(make_estimator("sds", prior), prior, z, 50.0, seed=3)
    torch.testing.assert_close(plain.grad, sds.grad, rtol=1e-4, atol=1e-5)  # phi = 0 is SDS
    with pytest.raises(ValueError, match="rescale_phi"):
        make_estimator("cfg-rescale", prior, {"rescale_phi": 1.5})


def test_ism_matches_lucid_dreamer_interval_score(prior):
    """x_s: the clean latents DDIM-inverted with the unconditional prediction (strides of 200) to s = t - 50;
    x_t: one more inversion step; direction: guided prediction at x_t minus the unconditional one at x_s."""
    z = latents(prior, n=1)
    text, null = embs(prior)
    est = make_estimator("ism", prior, {"schedule": {"min_frac": 0.6, "max_frac": 0.6}})
    out = run_step(est, prior, z, 20.0, seed=5)
    assert out.stats["t"] == 600
    torch.manual_seed(5)
    est.config.schedule.sample(0, 1, 1000, z.device)
    noise = torch.randn(z.shape)
    ab = prior.alphas_cumprod

    def invert(x, a, b):  # deterministic DDIM from step a to step b with the unconditional prediction
        eps = prior.predict_noise(x, torch.tensor([a]), null)
        return ab[b].sqrt() * _x0(x, eps, ab[a]) + (1 - ab[b]).sqrt() * eps, eps

    x = ab[0].sqrt() * z.detach() + (1 - ab[0]).sqrt() * noise
    for a, b in ((0, 200), (200, 400), (400, 550)):
        x, _ = invert(x, a, b)
    x_t, eps_s = invert(x, 550, 600)
    tt = torch.tensor([600])
    eps_c, eps_u = prior.predict_noise(x_t, tt, text), prior.predict_noise(x_t, tt, null)
    expected = (1 - ab[600]) * (eps_u + 20 * (eps_c - eps_u) - eps_s)
    torch.testing.assert_close(out.grad, expected, rtol=1e-4, atol=1e-5)
    assert out.stats["unet_forward"] == 3 + 1 + 2  # three inversion strides, the x_s prediction, the CFG pair
    sds = run_step(make_estimator("sds", prior, {"schedule": {"min_frac": 0.6, "max_frac": 0.6}}), prior, z, 20.0,
                   seed=5)
    assert not torch.allclose(out.grad, sds.grad)  # not the fresh noise of SDS


def test_dds_vanishes_on_the_source_and_matches_eq4(prior):
    z = latents(prior)
    text, null = embs(prior)
    est = make_estimator("dds", prior)
    with pytest.raises(ValueError, match="set_source"):
        run_step(est, prior, z, 7.5)
    est.set_source(z, text)
    assert run_step(est, prior, z, 7.5).grad.abs().max() == 0
    src = prior.encode_text(["a blue cube"])
    z_src = latents(prior, seed=2).detach()
    est.set_source(z_src, src)
    out = run_step(est, prior, z, 7.5, seed=8)
    torch.manual_seed(8)
    t = est.config.schedule.sample(0, 2, 1000, z.device)
    noise = torch.randn(z.shape)

    def guided(x, emb):
        x_t = prior.add_noise(x, noise, t)
        c = prior.predict_noise(x_t, t, emb.expand(2, -1, -1))
        u = prior.predict_noise(x_t, t, null.expand(2, -1, -1))
        return u + 7.5 * (c - u)

    w_t = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1)
    torch.testing.assert_close(out.grad, w_t * (guided(z.detach(), text) - guided(z_src, src)), rtol=1e-5, atol=1e-5)


def test_nan_guard_and_clipping(prior):
    z = latents(prior)
    est = make_estimator("sds", prior, {"grad_clip": 0.01})
    predict = prior.predict_noise

    def broken(z_t, t, emb, class_labels=None):
        out = predict(z_t, t, emb, class_labels)
        out[:, 0, 0, 0] = float("nan")
        return out

    prior.predict_noise = broken
    out = run_step(est, prior, z, 100.0)
    assert torch.isfinite(out.grad).all() and torch.isfinite(out.loss)
    assert out.grad.abs().max() <= 0.01 and out.stats["nonfinite"] == 2


def test_state_dict_round_trip(prior):
    z = latents(prior)
    text, null = embs(prior)
    est = make_estimator("lods-embed", prior, {"lr": 1e-2})
    assert est.state_dict() == {}
    run_step(est, prior, z, 10.0)
    est.update(z.detach(), text, null)
    again = make_estimator("lods-embed", prior)
    again.load_state_dict(est.state_dict())
    assert torch.equal(again.alpha, est.alpha) and again.lr == 1e-2
    torch.manual_seed(0)
    est.update(z.detach(), text, null)
    torch.manual_seed(0)
    again.update(z.detach(), text, null)
    assert torch.equal(again.alpha, est.alpha)


def test_factory(prior):
    assert set(METHODS) == {"sds", "sds-ref", "sds-norm", "lods-embed", "lods-lora", "vsd", "cfg-anneal",
                            "cfg-rescale", "ism", "dds"}
    with pytest.raises(ValueError, match="lods-embed"):
        make_estimator("nope", prior)
    with pytest.raises(ValueError, match="unknown guidance settings"):
        make_estimator("sds", prior, {"lrr": 1})
    est = make_estimator("sds", prior, {"schedule": {"anneal": "step", "anneal_step": 10}})
    assert est.config.schedule.bounds(20, 1000) == (20, 500)
    lora = make_estimator("lods-lora", prior)
    assert lora.adapter in prior.adapters and lora.lr == 5e-7
    lora.close()
    assert lora.adapter not in prior.adapters
