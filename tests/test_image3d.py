"""Image to 3D: the input image and its mask, bad inputs as one-line errors, the reference-view loss at the input
camera, and a short run end to end on the toy prior with a tiny random view-conditioned prior."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_views_prior import build_tiny_zero123

from lods.__main__ import main
from lods.cameras import orbit
from lods.config import RunConfig
from lods.errors import UserError
from lods.priors.views import ViewConditionedPrior
from lods.runs.image3d import (
    DEFAULT_CAMERA,
    ImageTo3DTrainer,
    InputImage,
    caption_from_judge,
    generate_from_image,
    load_input_image,
    world_input,
)


@pytest.fixture(scope="module")
def view_folder(tmp_path_factory):
    return build_tiny_zero123(tmp_path_factory.mktemp("zero123"))


@pytest.fixture(scope="module")
def toy_prior():
    from lods.priors.diffusers_prior import DiffusersPrior

    return DiffusersPrior.from_pretrained("toy")


def _save(path, array, mode):
    Image.fromarray(array, mode).save(path)
    return path


def test_mask_from_alpha(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 5:25] = (200, 40, 40, 255)
    inp = load_input_image(_save(tmp_path / "a.png", rgba, "RGBA"), 20)
    assert inp.rgb.shape == (1, 3, 20, 20) and inp.mask.shape == (1, 1, 20, 20)
    assert inp.mask[0, 0, 7, 7] == 1 and inp.mask[0, 0, 2, 17] == 0
    torch.testing.assert_close(inp.rgb[0, :, 2, 17], torch.ones(3))  # transparent pixels become white
    assert inp.rgb[0, 0, 7, 7] > 0.7 and inp.rgb[0, 1, 7, 7] < 0.25 and inp.sidecar == {}


def test_mask_from_the_background_colour(tmp_path):
    rgb = np.full((30, 60, 3), 90, np.uint8)  # grey background, wider than tall: padded square
    rgb[11:21, 26:36] = (30, 160, 30)
    inp = load_input_image(_save(tmp_path / "b.png", rgb, "RGB"), 30)
    assert inp.mask.shape == (1, 1, 30, 30)
    assert inp.mask[0, 0, 15, 15] == 1 and inp.mask[0, 0, 2, 2] == 0 and inp.mask[0, 0, 15, 3] == 0
    assert int(inp.mask.sum()) == pytest.approx(25, abs=2)  # a 10x10 square at half size
    torch.testing.assert_close(inp.rgb[0, :, 2, 2], torch.ones(3))


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_input_image(tmp_path / "missing.png", 64)
    good = _save(tmp_path / "good.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8), "RGB")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match="cannot be read"):
        load_input_image(truncated, 64)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UserError, match="not an image"):
        load_input_image(tmp_path / "text.png", 64)
    Image.new("L", (5000, 4000)).save(tmp_path / "huge.png")
    with pytest.raises(UserError, match="too large"):
        load_input_image(tmp_path / "huge.png", 64)
    with pytest.raises(UserError, match="no foreground"):
        load_input_image(_save(tmp_path / "white.png", np.full((32, 32, 3), 255, np.uint8), "RGB"), 64)
    with pytest.raises(UserError, match="no foreground"):
        load_input_image(_save(tmp_path / "clear.png", np.zeros((32, 32, 4), np.uint8), "RGBA"), 64)


def test_cli_bad_image_is_one_line(tmp_path, capsys):
    assert main(["generate", "--image", str(tmp_path / "nope.png"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not found" in err and "\n" not in err
    assert main(["generate", "--out", str(tmp_path / "run")]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_world_input_and_its_caption(tmp_path):
    path = world_input(tmp_path / "in.png", 1)
    side = json.loads(path.with_suffix(".json").read_text())
    inp = load_input_image(path, 64)
    assert inp.sidecar == side and 0 < float(inp.mask.mean()) < 1
    assert caption_from_judge(inp.rgb) == side["caption"]  # the judge reads a clean world render right


def _trainer(toy_prior, view_folder, image: InputImage, **image3d) -> ImageTo3DTrainer:
    cfg = RunConfig.from_dict({"prompt": "a red cube", "steps": 2, "batch": 1, "image3d": image3d,
                               "gaussians": {"num_points": 300}})
    return ImageTo3DTrainer(cfg, image, ViewConditionedPrior.from_pretrained(str(view_folder)), prior=toy_prior)


def test_reference_loss_is_measured_at_the_input_camera(toy_prior, view_folder):
    side = {"elevation": 25.0, "azimuth": 60.0, "distance": 2.9, "fovy": 42.0}
    blank = InputImage(torch.ones(1, 3, 64, 64), torch.zeros(1, 1, 64, 64), side)
    tr = _trainer(toy_prior, view_folder, blank)
    assert float(tr.ref_camera.azimuth[0]) == 60.0 and float(tr.ref_camera.elevation[0]) == 25.0
    with torch.no_grad():
        own = tr.scene.render(tr.ref_camera, torch.ones(1, 3))
        other = tr.scene.render(orbit(torch.tensor([150.0]), torch.tensor([25.0]), torch.tensor([2.9]),
                                      torch.tensor([42.0]), 64, 64), torch.ones(1, 3))
    # The scene's own render at the input camera is a perfect input; one from another camera is not.
    tr.ref_rgb, tr.ref_mask = own.rgb.clone(), (own.alpha > 0.5).float()
    rgb_loss, mask_loss = tr.reference_loss()
    assert rgb_loss.item() < 1e-10 and mask_loss.item() < 0.05
    tr.ref_rgb = other.rgb.clone()
    assert tr.reference_loss()[0].item() > 1e-4
    rgb_loss, _ = tr.reference_loss()
    rgb_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.scene.parameters())
    # The config's own camera wins over the sidecar's; without either, the default camera.
    assert float(_trainer(toy_prior, view_folder, blank, ref_azimuth=-30.0).ref_camera.azimuth[0]) == -30.0
    plain = InputImage(blank.rgb, blank.mask, {})
    assert float(_trainer(toy_prior, view_folder, plain).ref_camera.elevation[0]) == DEFAULT_CAMERA["elevation"]


@pytest.mark.parametrize("view_method", ["sds", "lods-embed"])
def test_a_step_adds_both_priors_and_the_reference_terms(toy_prior, view_folder, tmp_path, view_method):
    path = world_input(tmp_path / "in.png", 0)
    tr = _trainer(toy_prior, view_folder, load_input_image(path, 64), view_method=view_method)
    stats = tr.train_step()
    for key in ("ref_rgb_loss", "ref_mask_loss", "view_sds_loss", "loss"):
        assert np.isfinite(stats[key])
    assert stats["view_sds_loss"] > 0 and stats["ref_mask_loss"] > 0
    if view_method == "lods-embed":
        assert tr.view_null.abs().sum() > 0 and "view_null_loss" in stats  # the null token learned


def test_generate_from_a_world_image_end_to_end(toy_prior, view_folder, tmp_path):
    path = world_input(tmp_path / "in.png", 2)
    vp = ViewConditionedPrior.from_pretrained(str(view_folder))
    summary = generate_from_image({"steps": 2, "batch": 1, "gaussians": {"num_points": 300}}, path,
                                  tmp_path / "run", prior=toy_prior, view_prior=vp, progress=False, video=False)
    run = tmp_path / "run"
    assert summary["prompt"] == json.loads(path.with_suffix(".json").read_text())["caption"]
    assert (run / "novel_views.png").is_file() and (run / "reference.png").is_file()
    assert (run / "scene.ply").is_file() and (run / "summary.json").is_file()
    saved = json.loads((run / "summary.json").read_text())
    assert len(saved["image3d"]["novel_psnr"]) == 3 and 0 <= saved["image3d"]["novel_judged_right"] <= 1
    grid = np.asarray(Image.open(run / "novel_views.png"))
    assert grid.shape[0] > grid.shape[1] / 3  # two rows of four 64-pixel views
    with pytest.raises(UserError, match="3D backbone"):
        generate_from_image({"backbone": "image"}, path, tmp_path / "x", prior=toy_prior, view_prior=vp)


def test_bench_image3d_runs_resumes_and_reports(toy_prior, view_folder, tmp_path):
    from lods.bench.image3d import run_image3d_bench

    vp = ViewConditionedPrior.from_pretrained(str(view_folder))
    settings = {"batch": 1, "gaussians": {"num_points": 300}}
    rows = run_image3d_bench(tmp_path, steps=2, variants=("view-only", "lods-embed"), scenes=(0, 1), prior=toy_prior,
                             view_prior=vp, run_settings=settings)
    assert sorted((r["scene"], r["variant"]) for r in rows) == [(0, "lods-embed"), (0, "view-only"),
                                                               (1, "lods-embed"), (1, "view-only")]
    report = json.loads((tmp_path / "report.json").read_text())
    assert {t["measure"] for t in report["tests"]} == {"psnr", "feature_distance", "judged_right"}
    assert all(t["n"] == 2 and t["a"] == "view-only" and t["b"] == "lods-embed" for t in report["tests"])
    ran = yaml.safe_load((tmp_path / "runs" / "scene0-view-only-seed0" / "config.yaml").read_text())
    assert ran["image3d"]["text_weight"] == 0.0
    stamp = (tmp_path / "runs" / "scene0-lods-embed-seed0" / "summary.json").stat().st_mtime_ns
    run_image3d_bench(tmp_path, steps=2, variants=("view-only", "lods-embed"), scenes=(0, 1), prior=toy_prior,
                      view_prior=vp, run_settings=settings)
    assert (tmp_path / "runs" / "scene0-lods-embed-seed0" / "summary.json").stat().st_mtime_ns == stamp
    assert "| lods-embed |" in (tmp_path / "report.md").read_text()
