"""The view-conditioned prior (Zero-1-to-3 layout) on a tiny random folder built here: loading, conditioning, CFG."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lods.priors.base import PriorError
from lods.priors.views import CCProjection, ViewConditionedPrior, load_cc_projection, relative_camera


def build_tiny_zero123(out: Path, embed: int = 12, context: int = 16) -> Path:
    """Random tiny Zero-1-to-3 components (8x8x4 latents, 16x16 images), saved as diffusers/transformers do."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context, attention_head_dim=4, norm_num_groups=4,
    ).save_pretrained(out / "unet", safe_serialization=True)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, sample_size=16,
    ).save_pretrained(out / "vae", safe_serialization=True)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, projection_dim=embed,
    )).save_pretrained(out / "image_encoder", safe_serialization=True)
    CCProjection(embed + 4, context).save_pretrained(out / "cc_projection", safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        out / "feature_extractor")
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear").save_pretrained(out / "scheduler")
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_zero123(tmp_path_factory.mktemp("zero123"))


@pytest.fixture(scope="module")
def prior(folder) -> ViewConditionedPrior:
    p = ViewConditionedPrior.from_pretrained(str(folder))
    torch.manual_seed(1)
    p.set_reference(torch.rand(1, 3, 32, 32), elevation=15.0, azimuth=0.0, distance=2.8)
    return p


def test_loads_the_layout_and_its_geometry(prior, folder):
    assert prior.image_size == 16 and prior.latent_shape == (4, 8, 8) and prior.camera_mode == "zero123"
    assert not any(p.requires_grad for p in prior.unet.parameters())
    assert json.loads((folder / "cc_projection" / "config.json").read_text())["in_channel"] == 16
    cc = load_cc_projection(folder / "cc_projection")
    torch.testing.assert_close(cc.projection.weight, prior.cc_projection.projection.weight)
    assert prior.reference["concat"].shape == (1, 4, 8, 8) and prior.reference["embeds"].shape == (1, 12)


def test_relative_camera_follows_zero123():
    same = relative_camera(torch.tensor([15.0]), torch.tensor([30.0]), torch.tensor([2.8]), 15.0, 30.0, 2.8)
    torch.testing.assert_close(same, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    cam = relative_camera(torch.tensor([45.0]), torch.tensor([120.0]), torch.tensor([3.0]), 15.0, 30.0, 2.5)
    torch.testing.assert_close(cam, torch.tensor([[math.radians(-30), 1.0, 0.0, 0.5]]), atol=1e-6, rtol=0)
    stable = relative_camera(torch.tensor([45.0]), torch.tensor([120.0]), torch.tensor([3.0]), 15.0, 30.0, 2.5,
                             mode="stable")
    assert stable[0, 3].item() == pytest.approx(math.radians(75))
    with pytest.raises(PriorError):
        relative_camera(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0]), 0, 0, 1, mode="other")


def test_a_changed_camera_changes_the_prediction(prior):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    one = prior.predict_noise(z, t, torch.tensor([15.0]), torch.tensor([90.0]), torch.tensor([2.8]), 1.0)
    again = prior.predict_noise(z, t, torch.tensor([15.0]), torch.tensor([90.0]), torch.tensor([2.8]), 1.0)
    other = prior.predict_noise(z, t, torch.tensor([15.0]), torch.tensor([180.0]), torch.tensor([2.8]), 1.0)
    torch.testing.assert_close(one, again)
    assert (one - other).abs().max() > 1e-4


def test_the_unconditional_branch_is_the_null_conditioning(prior):
    """CFG weight 0 leaves the unconditional branch alone: zero context and zero concatenated latent."""
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([300, 700])
    el, az, dist = torch.tensor([10.0, 30.0]), torch.tensor([45.0, -90.0]), torch.tensor([2.7, 3.0])
    uncond = prior.predict_noise(z, t, el, az, dist, guidance_scale=0.0)
    with torch.no_grad():
        direct = prior.unet(torch.cat([z, torch.zeros_like(z)], 1), t,
                            encoder_hidden_states=torch.zeros(2, 1, 16)).sample
    torch.testing.assert_close(uncond, direct)
    cond = prior.predict_noise(z, t, el, az, dist, guidance_scale=1.0)
    assert (cond - uncond).abs().max() > 1e-4
    mixed = prior.predict_noise(z, t, el, az, dist, guidance_scale=3.0)
    torch.testing.assert_close(mixed, uncond + 3 * (cond - uncond), atol=1e-5, rtol=1e-4)


def test_sds_gradient_reaches_the_rendered_views(prior):
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    loss = prior.sds_loss(images, torch.tensor([20.0, 20.0]), torch.tensor([90.0, 180.0]), torch.tensor([2.8, 2.8]),
                          generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_sampling_shapes_and_determinism(prior):
    a = prior.sample(torch.tensor([20.0]), torch.tensor([90.0]), torch.tensor([2.8]), steps=3, seed=4)
    b = prior.sample(torch.tensor([20.0]), torch.tensor([90.0]), torch.tensor([2.8]), steps=3, seed=4)
    assert a.shape == (1, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b)


def test_no_reference_is_a_one_line_error(folder):
    p = ViewConditionedPrior.from_pretrained(str(folder))
    with pytest.raises(PriorError, match="set_reference"):
        p.predict_noise(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.tensor([0.0]), torch.tensor([0.0]),
                        torch.tensor([2.8]))


def test_bad_folders_are_one_line_errors(folder, tmp_path):
    with pytest.raises(PriorError, match="missing cc_projection/config.json"):
        broken = tmp_path / "no_cc"
        shutil.copytree(folder, broken)
        shutil.rmtree(broken / "cc_projection")
        ViewConditionedPrior.from_pretrained(str(broken))
    bins = tmp_path / "bins"
    shutil.copytree(folder, bins)
    weights = bins / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(PriorError, match="only safetensors"):
        ViewConditionedPrior.from_pretrained(str(bins))
    with pytest.raises(PriorError, match="no model folder"):
        ViewConditionedPrior.from_pretrained(str(tmp_path / "nowhere"))
    for err in (PriorError,):
        try:
            ViewConditionedPrior.from_pretrained(str(tmp_path / "nowhere"))
        except err as e:
            assert "\n" not in str(e)


def test_stable_zero123_camera_mode_from_the_folder(folder, tmp_path):
    stable = tmp_path / "stable"
    shutil.copytree(folder, stable)
    (stable / "lods_prior.json").write_text(json.dumps({"camera_mode": "stable"}))
    assert ViewConditionedPrior.from_pretrained(str(stable)).camera_mode == "stable"
