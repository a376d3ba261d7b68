"""The toy view-conditioned prior: its hold-out rule, its paired renders, its null conditioning in training and its
export in the Zero-1-to-3 layout."""

from __future__ import annotations

import torch

from lods.cameras import orbit
from lods.priors.toy import views as V
from lods.priors.views import CCProjection, ViewConditionedPrior


def test_hold_out_rule():
    train = [V.training_scene(i) for i in range(300)]
    assert not any(s.held_out for s in train)
    held = [V.held_out_scene(i) for i in range(9)]
    assert all(s.held_out for s in held)
    assert [s.category for s in held[:3]] == ["single", "surroundings", "multi"]
    assert V.held_out_scene(4) == V.held_out_scene(4)


def test_paired_renders_show_one_scene_instance():
    scene = V.training_scene(3)
    cams = orbit(torch.tensor([0.0, 0.0, 90.0]), torch.full((3,), 20.0), torch.full((3,), 2.8),
                 torch.full((3,), 42.0), 32, 32)
    r = V.render_views(scene, cams, 11)
    assert r.shape == (3, 3, 32, 32)
    torch.testing.assert_close(r[0], r[1])  # same camera, same placement, patterns and yaw
    assert (r[0] - r[2]).abs().max() > 0.05
    assert (V.render_views(scene, cams[:1], 12)[0] - r[0]).abs().max() > 0  # another instance


def _data(n: int = 2):
    gen = torch.Generator().manual_seed(0)
    return {"rgb": torch.randint(0, 255, (n, 4, 3, 64, 64), generator=gen, dtype=torch.uint8),
            "mu": torch.randn(n, 4, 4, 16, 16, generator=gen),
            "elevation": torch.rand(n, 4, generator=gen) * 30, "azimuth": torch.rand(n, 4, generator=gen) * 360,
            "distance": 2.6 + torch.rand(n, 4, generator=gen) * 0.5}


def test_null_rows_ignore_the_input_view_and_camera():
    torch.manual_seed(0)
    unet, enc, cc = V.build_view_unet(), V.build_image_encoder(), CCProjection(132, 128)
    fe = V.build_feature_extractor()
    data = _data()
    alphas = V.sd_scheduler().alphas_cumprod
    scene, dst, t = torch.tensor([0, 1]), torch.tensor([3, 3]), torch.tensor([400, 600])
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))

    def loss(src, null):
        with torch.no_grad():
            return V.view_loss(unet, enc, cc, fe, data, scene, torch.tensor(src), dst, t, noise,
                               torch.tensor(null), 1.0, alphas).item()

    assert loss([0, 0], [True, True]) == loss([1, 2], [True, True])
    assert loss([0, 0], [False, False]) != loss([1, 2], [False, False])


def test_export_loads_as_a_view_conditioned_prior(tmp_path):
    torch.manual_seed(0)
    out = V.export_views(V.build_view_unet(), V.build_image_encoder(), CCProjection(132, 128),
                         V.build_feature_extractor(), V.load_toy_vae(), tmp_path / "views", {"steps": 0})
    prior = ViewConditionedPrior.from_pretrained(str(out))
    assert prior.camera_mode == "zero123" and prior.image_size == 64 and prior.latent_shape == (4, 16, 16)
    assert all(p.suffix != ".bin" for p in out.rglob("*"))
    prior.set_reference(torch.rand(1, 3, 64, 64), 20.0, 0.0, 2.85)
    eps = prior.predict_noise(torch.randn(2, 4, 16, 16), torch.tensor([100, 800]), torch.tensor([20.0, 20.0]),
                              torch.tensor([90.0, 180.0]), torch.tensor([2.85, 2.85]))
    assert eps.shape == (2, 4, 16, 16) and torch.isfinite(eps).all()


def test_the_shipped_view_prior_loads_offline_and_sees_the_camera():
    prior = ViewConditionedPrior.from_pretrained("toy-views")
    assert prior.image_size == 64 and prior.camera_mode == "zero123"
    assert all(p.suffix != ".bin" for p in V.VIEWS_DIR.rglob("*"))
    prior.set_reference(V.render_views(V.held_out_scene(0), orbit(torch.tensor([0.0]), torch.tensor([20.0]),
                                                                  torch.tensor([2.85]), torch.tensor([42.5]), 64, 64),
                                       V.EVAL_SEED), 20.0, 0.0, 2.85)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    t = torch.tensor([500, 500])  # the same noisy latent, two target cameras
    a = prior.predict_noise(z, t, torch.tensor([20.0, 20.0]), torch.tensor([0.0, 180.0]), torch.tensor([2.85, 2.85]))
    assert (a[0] - a[1]).abs().mean() > 1e-3
