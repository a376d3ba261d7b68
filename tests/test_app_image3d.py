"""Image to 3D on the page: an input view (an upload or a world render) makes a Studio run image-to-3D, the two
priors' weights turn live, the previews show the input and the world's true views above the renders, and the
Compare tab runs SDS against LODS-embed on the text prior from the same input."""

from __future__ import annotations

import json
import math
import os
import types
from pathlib import Path

import pytest
import torch

from app.config import build_run_config
from app.jobs import JobManager
from app.ui import AppSettings, Studio
from lods.config import Knobs, RunConfig
from lods.errors import UserError
from lods.priors.toy.views import held_out_scene

OVERRIDES = {"batch": 1, "gaussians": {"num_points": 300}, "snapshot_every": 1, "preview_views": 4}
ME = types.SimpleNamespace(session_hash="me")
SETUP = dict(prompt="", negative_prompt="", prior="toy", custom_model="", backbone="gs", method="lods-embed",
             cfg=100.0, lr_scale=1.0, learned_lr=1e-3, steps=3, seed=0)


@pytest.fixture(scope="module")
def toy_factory():
    from lods.trainer import load_prior

    return lambda name, device: load_prior(name, device)


@pytest.fixture
def studio(toy_factory):
    manager = JobManager(prior_factory=toy_factory, abandon_after_s=0)
    yield Studio(manager, AppSettings(run_overrides=OVERRIDES, unload_grace_s=0))
    manager.shutdown()


def test_a_world_render_makes_the_run_image_to_3d(studio):
    message = studio.start(*SETUP.values(), image=None, world_scene=0, text_weight=2.0, view_weight=30.0,
                           request=ME)
    assert "Started run" in message, message
    job = studio.manager.current()
    c = job.config
    assert c.image3d.input_image.endswith("world-scene-0.png") and Path(c.image3d.input_image).is_file()
    assert c.prompt == held_out_scene(0).caption  # the empty prompt took the world's caption
    assert (c.image3d.text_weight, c.image3d.view_weight) == (2.0, 30.0)
    job.thread.join(120)
    assert job.phase == "done", job.message
    from app.format import status_text

    assert "Image to 3D" in status_text(job, "me") and "view 30" in status_text(job, "me")
    names = {p.name for p in job.files}
    assert {"reference.png", "novel_views.png", "scene.ply", "summary.json"} <= names
    summary = json.loads((job.out_dir / "summary.json").read_text())
    assert len(summary["image3d"]["novel_psnr"]) == 3 and 0 <= summary["image3d"]["novel_judged_right"] <= 1
    # the page's renders: the input and the world's true views above, the render at the input camera and the
    # generated views below (two rows of four)
    renders, *_ = studio.draw({}, request=ME)
    assert renders.shape[1] > renders.shape[0] and renders.shape[0] >= 2 * 64
    top_left = torch.from_numpy(renders[:renders.shape[0] // 2, :renders.shape[1] // 4].copy()).float()
    assert top_left.std() > 5  # the input view, not a blank tile
    config = json.loads(json.dumps(summary))  # the folder's config.yaml records the input
    assert config["prompt"] == c.prompt
    assert "input_image: " in (job.out_dir / "config.yaml").read_text()


def test_the_priors_weights_turn_live_in_an_image_run_only(studio):
    assert "Started run" in studio.start(*{**SETUP, "steps": 500}.values(), world_scene=1, request=ME)
    job = studio.manager.current()
    assert "set to 5" in studio.set_view_weight(5, request=ME)
    assert "set to 0.5" in studio.set_text_weight(0.5, request=ME)
    assert "⚠️" in studio.set_view_weight(float("nan"), request=ME)
    for _ in range(600):
        if job.trainer is not None and job.trainer.step >= 2:
            break
        job.thread.join(0.1)
    assert job.knob("view_weight") == 5.0 and job.knob("text_weight") == 0.5
    studio.stop(request=ME)
    job.thread.join(60)
    ran = job.trainer.resolved_config()
    assert (ran.image3d.view_weight, ran.image3d.text_weight) == (5.0, 0.5)  # what ran, in config.yaml
    # A text-to-3D run has no priors' weights: the page says so, the trainer refuses them.
    assert "Started run" in studio.start(*{**SETUP, "prompt": "a red cube", "steps": 500}.values(), request=ME)
    text_job = studio.manager.current()
    assert "text-to-3D" in studio.set_view_weight(5, request=ME)
    with pytest.raises(UserError, match="image-to-3D runs only"):
        Knobs.of(text_job.config).replace("sds", view_weight=5.0)
    studio.stop(request=ME)
    text_job.thread.join(60)


def test_bad_input_views_are_one_line_errors(studio, tmp_path):
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    cases = [
        (dict(image=str(truncated)), "cut.png"),
        (dict(image=str(tmp_path / "missing.png")), "missing.png"),
        (dict(world_scene=99), "no world scene"),
        (dict(world_scene=0, view_weight=float("nan")), "view prior's weight"),
        (dict(world_scene=0, text_weight=-1), "text prior's weight"),
    ]
    for extra, words in cases:
        message = studio.start(*SETUP.values(), **extra, request=ME)
        assert message.startswith("⚠️") and words in message and "\n" not in message.strip(), message
    assert "image-to-3D needs a 3D backbone" in studio.start(*{**SETUP, "backbone": "image"}.values(), world_scene=0,
                                                             request=ME)
    assert "prompt is empty" in studio.start(*SETUP.values(), request=ME)  # no input view, no prompt
    assert studio.manager.current() is None


def test_a_prompt_is_needed_where_the_prior_cannot_caption(tmp_path):
    from lods.runs.image3d import world_input

    path = world_input(tmp_path / "in.png", 2)
    fields = {k: v for k, v in SETUP.items() if k != "custom_model"}
    with pytest.raises(UserError, match="prompt is needed"):
        build_run_config(**{**fields, "prior": "some/model"}, image=str(path))
    config = build_run_config(**{**fields, "prompt": "a thing"}, image=str(path))
    assert config.prompt == "a thing" and config.image3d.input_image == str(path)


def test_compare_runs_sds_against_lods_on_the_text_prior_from_one_input(studio):
    preset = studio.compare_preset("image-to-3d")
    slots, steps, backbone, input_view = preset[:8], preset[8], preset[9], preset[11]
    methods = [s for s in slots[0::2]]
    assert methods[:2] == ["sds", "lods-embed"] and input_view == 0 and backbone == "gs"
    message = studio.compare_start("", "toy", "gs", 2, 0, "sds", "100", "lods-embed", "100", "off", "100", "off",
                                   "100", input_view, request=ME)
    assert "Started comparison" in message, message
    job = studio.manager.current()
    assert all(c.image3d.input_image and c.prompt == held_out_scene(0).caption for c in job.compare_configs)
    job.thread.join(180)
    assert job.phase == "done", job.message
    from lods.runs.image3d import ImageTo3DTrainer

    assert all(isinstance(t, ImageTo3DTrainer) for t in job.comparison.trainers)
    assert sum(p.name == "novel_views.png" for p in job.files) == 2
    assert not math.isnan(steps)


def test_a_config_without_an_input_has_no_weight_knobs():
    knobs = Knobs.of(RunConfig())
    assert knobs.text_weight is None and knobs.view_weight is None
    with_input = RunConfig.from_dict({"image3d": {"input_image": "x.png", "view_weight": 7}})
    assert Knobs.of(with_input).view_weight == 7.0


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")
def test_an_uploaded_view_runs_image_to_3d_in_the_browser(toy_factory, tmp_path):
    """Open the panel, upload an image with an empty prompt, press Start: an image-to-3D run with the world's
    caption trains, the status says so, its novel views come back as a file; picking a world render shows it."""
    playwright = pytest.importorskip("playwright.sync_api")
    from app.ui import build_demo, launch_local
    from lods.runs.image3d import world_input

    image = world_input(tmp_path / "upload.png", 4)
    jobs = JobManager(prior_factory=toy_factory, join_timeout=20)
    demo = build_demo(jobs, AppSettings(run_overrides=OVERRIDES, unload_grace_s=0))
    url = launch_local(demo)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
                "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url)
                page.wait_for_selector("#start", timeout=30_000)
                page.locator("#image3d").get_by_text("Image to 3D").first.click()
                page.locator("#image-in input[type=file]").set_input_files(str(image))
                page.wait_for_selector("#image-in img", timeout=20_000)
                page.locator("#prompt textarea").fill("")
                page.locator("#steps input").fill("4")
                page.locator("#start").click()
                page.wait_for_selector("#status :text('Image to 3D')", timeout=30_000)
                job = jobs.current()
                assert job.config.prompt == held_out_scene(4).caption  # the judge's reading of the upload
                page.wait_for_selector("#files [aria-label='novel_views.png']", timeout=120_000)
                assert job.phase == "done" and job.config.image3d.input_image
                # a world render picked from the menu shows in the input box
                page.locator("#world-pick input").click()
                page.get_by_role("option", name=f"world scene 2: {held_out_scene(2).caption}").click()
                page.wait_for_function("() => (document.querySelector('#image-in img')?.src || '')"
                                       ".includes('world-scene-2')", timeout=20_000)
            finally:
                browser.close()
    finally:
        jobs.shutdown()
        demo.close()
