"""DiffusersPrior on a tiny random Stable-Diffusion folder, and every estimator end to end on it."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import build_tiny_sd, word_level_tokenizer
from diffusers import DDPMScheduler, PNDMScheduler

from lods.cameras import sample_cameras
from lods.guidance import METHODS, make_estimator
from lods.priors import diffusers_prior
from lods.priors.base import DiffusionPrior, PriorError
from lods.priors.diffusers_prior import DiffusersPrior


@pytest.fixture(scope="module")
def prior(tiny_sd_dir) -> DiffusersPrior:
    return DiffusersPrior.from_pretrained(str(tiny_sd_dir))


def fresh_prior(tiny_sd_dir) -> DiffusersPrior:
    """A prior of its own, for tests that attach adapters."""
    return DiffusersPrior.from_pretrained(str(tiny_sd_dir))


def test_loads_components_and_geometry(prior):
    assert isinstance(prior, DiffusionPrior)
    assert prior.image_size == 16 and prior.latent_shape == (4, 8, 8)
    assert prior.dtype == torch.float32 and prior.device.type == "cpu"
    assert prior.num_train_timesteps == 1000
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    torch.testing.assert_close(prior.alphas_cumprod, torch.cumprod(1 - betas, 0))
    assert not any(p.requires_grad for p in prior.unet.parameters())


def test_text_embeddings_padded_and_cached(prior):
    emb = prior.encode_text(["a red cube", "", "a red cube"])
    assert emb.shape == (3, 16, 16)
    assert torch.equal(emb[0], emb[2]) and not torch.equal(emb[0], emb[1])
    ids = prior.tokenizer([""], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        null = prior.text_encoder(ids)[0]
    torch.testing.assert_close(prior.encode_text([""]), null)
    assert prior.encode_text([""]) is not null and torch.equal(prior.encode_text([""]), prior.encode_text([""]))


def test_images_round_trip_shapes_and_gradients(prior):
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    z = prior.encode_images(images)
    assert z.shape == (2, 4, 8, 8)
    z.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    out = prior.decode_latents(z.detach())
    assert out.shape == (2, 3, 16, 16) and out.min() >= 0 and out.max() <= 1


def test_add_noise_is_the_forward_process(prior):
    z, noise = torch.randn(2, 2, 4, 8, 8)
    t = torch.tensor([0, 999])
    ab = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(prior.add_noise(z, noise, t), ab.sqrt() * z + (1 - ab).sqrt() * noise)


def test_pixel_space_model_with_word_level_tokenizer_and_pndm_config(tmp_path):
    folder = build_tiny_sd(tmp_path / "pixel", vae=False, tokenizer=word_level_tokenizer())
    PNDMScheduler(  # what Stable Diffusion ships; only its noise schedule is read
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True, steps_offset=1
    ).save_pretrained(folder / "scheduler")
    p = DiffusersPrior.from_pretrained(str(folder))
    assert p.image_size == 8 and p.latent_shape == (3, 8, 8) and p.vae is None
    images = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(p.encode_images(images), images * 2 - 1)
    torch.testing.assert_close(p.decode_latents(images * 2 - 1), images)
    emb = p.encode_text(["a red cube", ""])
    assert emb.shape == (2, 16, 16) and not torch.equal(emb[0], emb[1])
    out = p.predict_noise(torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), emb)
    assert out.shape == (2, 3, 8, 8)


def test_v_prediction_is_converted_to_epsilon(prior):
    v_sched = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    )
    v_prior = DiffusersPrior(prior.unet, prior.vae, prior.text_encoder, prior.tokenizer, v_sched)
    z_t = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    emb = prior.encode_text(["a cube", ""])
    v = prior.predict_noise(z_t, t, emb)
    ab = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v_prior.predict_noise(z_t, t, emb), ab.sqrt() * v + (1 - ab).sqrt() * z_t)


def test_lora_off_reproduces_the_base_model_exactly(tiny_sd_dir):
    p = fresh_prior(tiny_sd_dir)
    z_t, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([50, 500]), p.encode_text(["a red cube", ""])
    base = p.predict_noise(z_t, t, emb)
    params = p.add_lora("test", rank=2)
    assert params and all(p_.dtype == torch.float32 for p_ in params)
    with p.lora_scale("test", 1.0):
        assert torch.equal(p.predict_noise(z_t, t, emb), base)  # lora_B starts at zero
    with torch.no_grad():
        for q in params:
            q.add_(0.3 * torch.randn_like(q))
    with p.lora_scale("test", 1.0):
        full = p.predict_noise(z_t, t, emb)
        with p.lora_scale(None):
            assert torch.equal(p.predict_noise(z_t, t, emb), base)
        assert torch.equal(p.predict_noise(z_t, t, emb), full)
    with p.lora_scale("test", 0.5):
        half = p.predict_noise(z_t, t, emb)
    with p.lora_scale("test", 0.0):
        assert torch.equal(p.predict_noise(z_t, t, emb), base)
    assert torch.equal(p.predict_noise(z_t, t, emb), base)
    assert not torch.allclose(full, base) and not torch.allclose(half, base) and not torch.allclose(half, full)
    with pytest.raises(ValueError):
        p.add_lora("test")
    p.remove_lora("test")
    assert torch.equal(p.predict_noise(z_t, t, emb), base)
    with pytest.raises(ValueError):
        with p.lora_scale("test"):
            pass


def test_camera_conditioning_only_acts_inside_the_adapter(tiny_sd_dir):
    p = fresh_prior(tiny_sd_dir)
    z_t, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([50, 500]), p.encode_text(["a red cube", "a red cube"])
    cams = sample_cameras(2, 16).c2w.reshape(2, 16)
    base = p.predict_noise(z_t, t, emb)
    params = p.add_lora("cam", rank=2, camera_conditioning=True)
    with p.lora_scale("cam", 1.0):
        assert torch.equal(p.predict_noise(z_t, t, emb, cams), base)  # zero-initialised
    with torch.no_grad():
        for q in params:
            q.add_(0.3 * torch.randn_like(q))
    with p.lora_scale("cam", 1.0):
        with_cam = p.predict_noise(z_t, t, emb, cams)
        no_cam = p.predict_noise(z_t, t, emb)
        zero_cam = p.predict_noise(z_t, t, emb, torch.zeros(2, 16))
    assert not torch.allclose(with_cam, no_cam) and not torch.allclose(zero_cam, no_cam)
    assert torch.equal(p.predict_noise(z_t, t, emb, cams), base)


def test_errors_are_one_line_prior_errors(tmp_path, tiny_sd_dir, monkeypatch):
    cases = [str(tmp_path / "missing")]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    cases.append(str(tmp_path / "notes"))
    bins = tmp_path / "bins"
    shutil.copytree(tiny_sd_dir, bins)
    (bins / "unet" / "diffusion_pytorch_model.safetensors").rename(bins / "unet" / "diffusion_pytorch_model.bin")
    cases.append(str(bins))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_dir, broken)
    (broken / "unet" / "config.json").write_text("{ not json")
    cases.append(str(broken))
    cases.append("lods-studio-tests/no-such-model")
    monkeypatch.setitem(diffusers_prior.ALIASES, "toy", str(tmp_path / "toy-weights"))
    cases.append("toy")
    messages = []
    for case in cases:
        with pytest.raises(PriorError) as info:
            DiffusersPrior.from_pretrained(case)
        messages.append(str(info.value))
    assert all("\n" not in m and m for m in messages)
    assert "toy-prior train" in messages[-1]
    assert "huggingface-cli download" in messages[-2]
    assert "missing unet/config.json" in messages[1]
    assert ".safetensors" in messages[2]
    assert diffusers_prior.ALIASES["sd21"] == "stabilityai/stable-diffusion-2-1-base"


@pytest.mark.parametrize(
    ("method", "merged"), [(m, False) for m in sorted(METHODS)] + [("lods-embed", True), ("lods-lora", True)]
)
def test_every_estimator_optimizes_theta_end_to_end(prior, method, merged):
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.rand(2, 3, 16, 16))
    opt = torch.optim.Adam([theta], lr=0.05)
    cams = sample_cameras(2, 16)
    text, null = prior.encode_text(["a red cube"]), prior.encode_text([""])
    est = make_estimator(method, prior, {"lr": 1e-2, "merge_update": merged})
    if method == "dds":
        est.set_source(prior.encode_images(torch.rand(1, 3, 16, 16)).detach(), prior.encode_text(["a blue cube"]))
    start = theta.detach().clone()
    learned_start = None
    for step in range(3):
        z = prior.encode_images(theta)
        out = est.step(z, text, null, 7.5, step, cams)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if learned_start is None and getattr(est, "params", None):
            learned_start = [q.detach().clone() for q in est.params]
        info = est.update(z.detach(), text, null, cams)
        assert torch.isfinite(out.grad).all() and out.stats["unet_forward"] >= 1
        assert (info is None) == (method not in ("lods-embed", "lods-lora", "vsd"))
    assert not torch.equal(theta.detach(), start)
    if learned_start is not None:
        assert any(not torch.equal(a, b.detach()) for a, b in zip(learned_start, est.params))
    est.close()
    assert prior._adapter is None


def _eager(prior, z_t, t, emb):
    return prior.unet(z_t, t, encoder_hidden_states=emb).sample


def test_the_traced_unet_is_bit_identical_to_the_module_at_any_batch(tiny_sd_dir):
    """On the CPU the UNet runs as a traced graph (one per latent size): the same numbers and gradients as the
    eager module, traced at the first call's batch and used at every other."""
    prior = fresh_prior(tiny_sd_dir)
    emb = prior.encode_text(["a red cube", "", "a blue sphere", "a red cube"])
    torch.manual_seed(0)
    assert not prior.unet_call._graphs
    for n in (1, 2, 4):
        z_t, t = torch.randn(n, 4, 8, 8), torch.randint(0, 1000, (n,))
        with torch.no_grad():
            assert torch.equal(prior.predict_noise(z_t, t, emb[:n]), _eager(prior, z_t, t, emb[:n]))
    assert len(prior.unet_call._graphs) == 1
    graph = next(iter(prior.unet_call._graphs.values()))
    assert isinstance(graph, torch.jit.ScriptFunction)

    z_t, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    grads = []
    for fn in (lambda e: prior.predict_noise(z_t, t, e), lambda e: _eager(prior, z_t, t, e)):
        e = emb[1:3].clone().requires_grad_(True)
        (fn(e) - torch.ones(2, 4, 8, 8)).square().mean().backward()
        grads.append(e.grad)
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])

    # the graph reads the UNet's own parameters (shared storage, no copy)
    z_t = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        before = prior.predict_noise(z_t, t[:1], emb[:1])
        prior.unet.conv_in.bias.add_(1.0)
        changed = prior.predict_noise(z_t, t[:1], emb[:1])
        prior.unet.conv_in.bias.sub_(1.0)
    assert not torch.equal(before, changed)

    # another latent size gets a graph of its own
    z_big = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(prior.predict_noise(z_big, t[:1], emb[:1]), _eager(prior, z_big, t[:1], emb[:1]))
    assert len(prior.unet_call._graphs) == 2


def test_adapters_and_trace_off_run_the_eager_module(tiny_sd_dir):
    prior = fresh_prior(tiny_sd_dir)
    prior.unet_call.trace = False
    emb = prior.encode_text(["a red cube"])
    z_t, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        prior.predict_noise(z_t, t, emb)
    assert not prior.unet_call._graphs
    prior.unet_call.trace = True
    prior.add_lora("psi", rank=2)
    with torch.no_grad(), prior.lora_scale("psi", 1.0):
        prior.predict_noise(z_t, t, emb)
    assert not prior.unet_call._graphs  # a LoRA adapter is attached: never traced
    prior.remove_lora("psi")  # the adapter's wrappers stay on the UNet, empty: traced again, still the base model
    with torch.no_grad():
        assert torch.equal(prior.predict_noise(z_t, t, emb), _eager(prior, z_t, t, emb))
    assert len(prior.unet_call._graphs) == 1


def test_a_unet_that_cannot_be_traced_runs_eagerly(tiny_sd_dir, monkeypatch):
    prior = fresh_prior(tiny_sd_dir)

    def fail(*_a, **_k):
        raise RuntimeError("not traceable")

    monkeypatch.setattr(torch.jit, "trace", fail)
    emb = prior.encode_text(["a red cube"])
    z_t, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with pytest.warns(UserWarning, match="runs eagerly"), torch.no_grad():
        out = prior.predict_noise(z_t, t, emb)
    with torch.no_grad():
        assert torch.equal(out, _eager(prior, z_t, t, emb))
        prior.predict_noise(z_t, t, emb)  # no second attempt, no second warning
    assert not prior.unet_call._graphs and prior.unet_call._untraceable

