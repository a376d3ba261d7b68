"""Inside one step: the parts of an update, the effective CFG, the look inside a live trainer, and its panel.

The tiny random SD-format prior of ``conftest.tiny_sd_dir`` stands in for a real one (16 px images,
8x8x4 latents); 2D-image runs of a few steps.
"""

from __future__ import annotations

import math
import os
import time
import types

import gradio as gr
import pytest
import torch

from lods.config import RunConfig
from lods.errors import UserError
from lods.guidance import effective_cfg, make_estimator, update_parts
from lods.inside import look_inside
from lods.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_prior(tiny_sd_dir):
    from lods.priors.diffusers_prior import DiffusersPrior

    return DiffusersPrior.from_pretrained(str(tiny_sd_dir))


def config(method: str, steps: int = 4, cfg: float = 50.0, **extra) -> RunConfig:
    return RunConfig.from_dict(dict(prompt="a red cube", prior="tiny", backbone="image", method=method, cfg=cfg,
                                    steps=steps, seed=0, resolution=16, batch=2, snapshot_every=2,
                                    preview_views=2, **extra))


def direction_with_parts(est, prior, cfg: float, seed: int = 0):
    """One call of ``direction`` and what it kept, on random latents."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, *prior.latent_shape, generator=g)
    noise = torch.randn(z.shape, generator=g)
    t = torch.tensor([300, 700])
    text = prior.encode_text(["a red cube"]).expand(2, -1, -1)
    null = prior.encode_text([""]).expand(2, -1, -1)
    z_t = prior.add_noise(z, noise, t)
    with torch.no_grad():
        raw, _ = est.direction(z_t, noise, t, text, null, cfg, 0, None)
        eps_null = prior.predict_noise(z_t, t, null)
    return raw, est._parts, eps_null, noise


# ----------------------------------------------------------------------------- the parts and the fit


def test_sds_direction_is_denoising_plus_w_times_classifier(tiny_prior):
    est = make_estimator("sds", tiny_prior, {})
    raw, kept, eps_null, noise = direction_with_parts(est, tiny_prior, 30.0)
    assert "eps_learned" not in kept
    torch.testing.assert_close(kept["eps_null"], eps_null, rtol=1e-4, atol=1e-5)
    classifier, denoising = kept["eps_c"] - kept["eps_null"], kept["eps_null"] - noise
    torch.testing.assert_close(raw, denoising + 30.0 * classifier, rtol=1e-4, atol=1e-4)


def test_lods_embed_direction_decomposes_into_the_parts_and_the_drift(tiny_prior):
    est = make_estimator("lods-embed", tiny_prior, {})
    null = tiny_prior.encode_text([""])
    est._ensure_alpha(null)
    with torch.no_grad():
        est.alpha.add_(0.3 * torch.randn(est.alpha.shape, generator=torch.Generator().manual_seed(3)))
    w = 40.0
    raw, kept, eps_null, noise = direction_with_parts(est, tiny_prior, w)
    assert "eps_null" not in kept  # LODS-embed makes no eps(null): the trainer's meter adds it every few steps
    classifier, denoising, drift = kept["eps_c"] - eps_null, eps_null - noise, kept["eps_learned"] - eps_null
    assert drift.abs().max() > 1e-3  # alpha moved, so eps(alpha) differs from eps(null)
    # w times Eq. 7 = denoising + w classifier + (1 - w) drift
    torch.testing.assert_close(w * raw, denoising + w * classifier + (1 - w) * drift, rtol=1e-4, atol=1e-4)


def test_effective_cfg_is_exact_for_sds_and_lower_when_the_drift_denoises():
    g = torch.Generator().manual_seed(0)
    eps_c, eps_u, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    classifier, denoising = eps_c - eps_u, eps_u - noise
    for w in (1.0, 7.5, 100.0, 1000.0, 5000.0):
        eff, r2 = effective_cfg(denoising + w * classifier, denoising, classifier)
        assert eff == pytest.approx(w, rel=1e-4) and r2 == pytest.approx(1.0, abs=1e-6)
        eff, _ = effective_cfg((denoising + w * classifier) / w, denoising, classifier)  # Eq. 7: Eq. 3 / w
        assert eff == pytest.approx(w, rel=1e-4)
    # LODS whose learned prediction moved a share k of the way from eps(null) to the added noise (what Eq. 8
    # trains it towards): w Eq. 7 = (1 + (w - 1) k) denoising + w classifier, so w' = w / (1 + (w - 1) k) < w
    w = 100.0
    for k in (0.01, 0.1, 0.5):
        eps_a = eps_u + k * (noise - eps_u)
        parts = update_parts(eps_c + (1 - w) / w * eps_a - noise / w, eps_c, eps_u, noise, eps_a)
        assert parts["eff_cfg"] == pytest.approx(w / (1 + (w - 1) * k), rel=1e-5) and parts["eff_cfg"] < w
        assert parts["cos_drift_denoising"] == pytest.approx(-1.0, abs=1e-5)
    # the infinite weight's direction has no denoising part: no SDS weight points that way
    parts = update_parts(eps_c - eps_u, eps_c, eps_u, noise)
    assert "eff_cfg" not in parts and parts["classifier_norm"] > 0


def test_trainer_logs_the_parts_and_the_meter_changes_nothing(tiny_prior):
    sds = Trainer(config("sds", cfg=30.0), prior=tiny_prior)
    sds.run()
    assert [h["eff_cfg"] for h in sds.history] == pytest.approx([30.0] * 4, rel=1e-4)
    assert all("drift_norm" not in h for h in sds.history)
    runs = {}
    for every in (0, 1, 3):
        tr = Trainer(config("lods-embed", steps=6, guidance={"parts_every": every}, learned_lr=0.05), prior=tiny_prior)
        tr.run()
        tr.close()
        runs[every] = tr
    assert not any("eff_cfg" in h for h in runs[0].history)
    assert [h["step"] for h in runs[3].history if "eff_cfg" in h] == [0, 3]
    assert runs[1].history[0]["eff_cfg"] == pytest.approx(50.0, rel=1e-4)  # alpha = null at step 0: LODS is SDS
    assert {"drift_norm", "cos_drift_classifier", "cos_drift_denoising"} <= runs[1].history[-1].keys()
    assert runs[1].history[-1]["drift_norm"] > 0
    for every in (1, 3):  # the extra eps(null) forward changes neither the scene nor alpha nor the losses
        assert torch.equal(runs[every].scene.theta, runs[0].scene.theta)
        assert torch.equal(runs[every].estimator.alpha, runs[0].estimator.alpha)
        assert [h["loss"] for h in runs[every].history] == [h["loss"] for h in runs[0].history]
        assert [h["unet_forward"] for h in runs[every].history] == [h["unet_forward"] for h in runs[0].history]


def test_formula_shows_the_live_constants(tiny_prior):
    tr = Trainer(config("lods-embed", learned_lr=0.003), prior=tiny_prior)
    text = tr.estimator.formula(100.0, 0)
    assert "-0.99" in text and "0.01" in text and "(w = 100)" in text and r"\alpha" in text
    assert "0.003" in text and "1-\\bar\\alpha_t" in text
    tr.set_knobs(cfg=7.5, learned_lr=1e-4)
    assert "5\\cdot 10^{-7}" in make_estimator("lods-lora", tiny_prior, {}).formula(7.5)
    tr._apply_knobs(tr.knobs)
    text = tr.estimator.formula(tr.knobs.cfg, 1)
    assert "(w = 7.5)" in text and "0.0001" in text and "-0.867" in text
    assert "\\infty" in tr.estimator.formula(math.inf)
    tr.close()
    sds = make_estimator("sds", tiny_prior, {"weighting": "uniform"})
    assert "+ 7.5" in sds.formula(7.5) and "w(t) = 1$" in sds.formula(7.5)


# ----------------------------------------------------------------------------- the look inside


@pytest.mark.parametrize("method", ["lods-embed", "lods-lora", "sds"])
def test_look_inside_images_parts_and_the_run_goes_on_unchanged(tiny_prior, method):
    extra = {"learned_lr": 0.05} if method != "sds" else {}
    plain = Trainer(config(method, steps=4, **extra), prior=tiny_prior)
    plain.run()
    plain.close()
    looked = Trainer(config(method, steps=4, **extra), prior=tiny_prior)
    looked.begin()
    looked.advance()
    looked.advance()
    looked.join_update()  # LODS-embed's update may still run in the trainer's second thread
    forward = looked.estimator._forward
    rng = torch.get_rng_state()
    inside = look_inside(looked, t=400, view=1, seed=5)
    assert torch.equal(torch.get_rng_state(), rng) and looked.estimator._forward == forward
    again = look_inside(looked, t=400, view=1, seed=5)
    while looked.advance():
        pass
    looked.close()
    assert torch.equal(looked.scene.theta, plain.scene.theta)  # looking changed nothing in the run
    names = list(inside.images)
    assert names[:4] == ["render", "noisy z_t", "x0 | eps(y)", "x0 | eps(null)"] and names[-1] == "x0 | guided"
    assert len(names) == (6 if method != "sds" else 5)
    assert all(img.shape == (16, 16, 3) and img.dtype.name == "uint8" for img in inside.images.values())
    assert inside.strip(min_side=32).shape == (32, len(names) * 32 + 6 * (len(names) - 1), 3)
    assert all(math.isfinite(v) for v in inside.parts.values())
    assert inside.parts["t"] == 400 and inside.step == 2 and inside.cfg == 50.0
    assert ("drift_norm" in inside.parts) == (method != "sds")
    if method == "sds":
        assert inside.parts["eff_cfg"] == pytest.approx(50.0, rel=1e-4)
    assert inside.parts == again.parts  # its own generator: the same seed, the same look
    assert "(w = 50)" in inside.formula or "+ 50" in inside.formula


def test_look_inside_refuses_bad_input_in_one_line(tiny_prior):
    tr = Trainer(config("sds"), prior=tiny_prior)
    for bad in (dict(t=1000), dict(t=-1), dict(t=math.nan), dict(view=2), dict(view=-1)):
        with pytest.raises(UserError) as err:
            look_inside(tr, **{"t": 10, "view": 0, **bad})
        assert "\n" not in str(err.value)
    lora = Trainer(config("lods-lora"), prior=tiny_prior)
    lora.close()  # a finished run: its adapter is gone from the prior
    with pytest.raises(UserError, match="no longer attached"):
        look_inside(lora, t=10)


def test_look_inside_at_an_infinite_weight_has_no_guided_image(tiny_prior):
    tr = Trainer(config("lods-embed", cfg=math.inf), prior=tiny_prior)
    inside = look_inside(tr, t=500)  # before the first step alpha is the null embedding: the direction is
    tr.close()  # the classifier term alone, which no finite SDS weight gives
    assert "x0 | guided" not in inside.images and "eff_cfg" not in inside.parts and inside.notes
    assert "x0 | eps(alpha)" in inside.images and inside.parts["drift_norm"] < 1e-4


def test_cli_writes_the_strip_and_the_parts(tiny_prior, tmp_path, monkeypatch):
    from lods.__main__ import main

    run = tmp_path / "run"
    tr = Trainer(config("lods-embed", steps=2), prior=tiny_prior, out_dir=run)
    tr.run()
    tr.close()
    monkeypatch.setattr("lods.trainer.shared_prior", lambda name, device=None: tiny_prior)
    assert main(["inside", "--checkpoint", str(run / "checkpoint.safetensors"), "--t", "300", "--view", "2",
                 "--out", str(tmp_path / "look")]) == 0
    import json

    summary = json.loads((tmp_path / "look" / "parts.json").read_text())
    assert summary["t"] == 300 and summary["view"] == 1 and summary["step"] == 2 and "eff_cfg" in summary["parts"]
    assert (tmp_path / "look" / "inside.png").stat().st_size > 0


# ----------------------------------------------------------------------------- the panel


def test_panel_callbacks_without_a_run_and_with_bad_input(tiny_prior):
    from app.inside_panel import PARTS_PLOTS, look, parts_frame, refresh

    class Manager:
        job = None

        def current(self):
            return self.job

        def touch(self, session):
            pass

    studio = types.SimpleNamespace(manager=Manager(), _session=lambda request: "me")
    out = look(studio, 500, "view 1", 0)
    assert out[0].startswith("Nothing to look inside yet") and "\n" not in out[0] and out[1] is None
    assert len(out) == 4 + len(PARTS_PLOTS)
    tr = Trainer(config("lods-embed", steps=3, guidance={"parts_every": 1}), prior=tiny_prior)
    tr.run()
    studio.manager.job = types.SimpleNamespace(is_comparison=False, trainer=tr)
    bad = look(studio, 500, "view 9", 0)
    assert bad[0].startswith("⚠️") and "view must be" in bad[0] and "\n" not in bad[0]
    good = look(studio, 500, "view 2", 1)
    assert "lods-embed at step 3" in good[0] and len(good[1]) == 6 and "Effective CFG" in good[2]
    assert "$$" in good[3]
    eff = good[4]
    assert set(eff["series"]) == {"w (the knob)", "effective w'"}
    assert len(eff[eff["series"] == "effective w'"]) == 3
    first = refresh(studio, None)
    assert "$$" in first[0] and len(first[1]) > 0
    assert refresh(studio, first[-1])[:-1] == (gr.skip(),) * 4  # nothing new: nothing sent
    assert parts_frame([], PARTS_PLOTS[0])["value"].isna().all()
    tr.close()
    studio.manager.job = types.SimpleNamespace(is_comparison=True, trainer=None)
    assert "comparison" in look(studio, 500, "view 1", 0)[0]


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")
def test_panel_in_a_browser(tiny_prior, monkeypatch):
    playwright = pytest.importorskip("playwright.sync_api")
    from app.config import ModelPolicy
    from app.jobs import JobManager
    from app.ui import AppSettings, build_demo, launch_local

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    jobs = JobManager(prior_factory=lambda name, device: tiny_prior, join_timeout=20)
    settings = AppSettings(policy=ModelPolicy(allowed=("toy",), custom_ids=False),
                           run_overrides={"resolution": 16, "batch": 1, "snapshot_every": 2, "preview_views": 2})
    demo = build_demo(jobs, settings)
    url = launch_local(demo)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            try:
                page = browser.new_page()
                page.goto(url)
                page.get_by_role("tab", name="Inside one step").click()
                page.locator("#inside-look").click()
                page.wait_for_selector("#inside-notice :text('Nothing to look inside yet')", timeout=20_000)
                job = jobs.start_or_queue(config("lods-embed", steps=5000), owner="someone")
                end = time.monotonic() + 30
                while (job.trainer is None or job.trainer.step < 3) and time.monotonic() < end:
                    jobs.touch("someone")
                    time.sleep(0.1)
                page.locator("#inside-look").click()
                page.wait_for_selector("#inside-notice :text('lods-embed at step')", timeout=20_000)
                assert page.locator("#inside-images img").count() >= 6
                page.wait_for_selector("#inside-formula .katex", timeout=20_000)
                assert "Effective CFG" in page.locator("#inside-parts").inner_text()
            finally:
                browser.close()
    finally:
        jobs.shutdown()
        demo.close()
