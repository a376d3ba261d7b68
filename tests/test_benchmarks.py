"""The measuring instruments: quality measures on hand-made cases, the claim verdicts, sweep, batch resume,
the Ray executor on a local cluster, and the speed benchmark's report."""

import csv
import json

import numpy as np
import pytest
import torch

from lods import metrics
from lods.__main__ import main
from lods.bench import quality
from lods.export import read_views
from lods.runs.batch import Job, _batch_job, is_done, map_jobs, read_prompts, slug


def test_floater_score_keeps_one_component_per_object():
    alpha = torch.zeros(1, 1, 32, 32)
    alpha[..., 2:10, 2:10] = 1.0  # object 1: 64 px
    alpha[..., 20:26, 20:26] = 1.0  # object 2: 36 px
    alpha[..., 30, 0] = 1.0  # a 1 px floater
    assert metrics.floater_score(alpha) == pytest.approx(37 / 101)
    assert metrics.floater_score(alpha, components=2) == pytest.approx(1 / 101)
    assert metrics.floater_score(alpha, components=3) == 0.0


def test_world_renders_measure_as_the_world_and_damage_shows():
    prompt = "a red cube"
    ref = quality.world_reference(prompt)
    rgb, alpha = ref["rgb"], (ref["rgb"] - 1).abs().amax(1, keepdim=True).gt(0.02).float()
    same = quality.measure(rgb, alpha, prompt, ref)
    assert same["feature_distance"] < 1e-5
    assert abs(same["saturation_error"]) < 0.05  # alpha from the image, not the world's mask: nearly equal
    assert same["alignment"] >= 0.75
    washed = rgb * 0.3 + 0.7 * rgb.mean(1, keepdim=True)  # colours pulled towards grey
    assert quality.measure(washed, alpha, prompt, ref)["saturation_error"] < -0.2
    gen = torch.Generator().manual_seed(0)
    blotchy = (rgb + (torch.rand(rgb.shape, generator=gen) > 0.8).float() * alpha).clamp(0, 1)  # white blotches
    damaged = quality.measure(blotchy, alpha, prompt, ref)
    assert damaged["artifact_score"] > same["artifact_score"] + 0.05
    assert damaged["clipped"] > same["clipped"]


def test_hard_floater_score_ignores_soft_edges_and_counts_opaque_specks():
    alpha = torch.zeros(1, 1, 32, 32)
    alpha[..., 4:20, 4:20] = 0.3  # a soft halo around the object
    alpha[..., 6:18, 6:18] = 1.0
    assert metrics.floater_score(alpha) == pytest.approx(0.3 * 112 / (144 + 0.3 * 112))  # the halo, soft
    assert metrics.floater_score(alpha, hard=True) == 0.0
    alpha[..., 28:30, 28:30] = 1.0  # an opaque 4 px speck
    assert metrics.floater_score(alpha, hard=True) == pytest.approx(4 / (144 + 4))


def test_detail_energy_reads_texture_inside_the_object_not_its_outline():
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[:, 8:24, 8:24] = True
    flat = torch.ones(1, 3, 32, 32)
    flat[..., 8:24, 8:24] = torch.tensor([0.8, 0.1, 0.1])[:, None, None]  # a plain square on white
    assert metrics.detail_energy(flat, mask) == pytest.approx(0.0, abs=1e-10)
    textured = flat.clone()
    textured[..., 8:24:2, 8:24] *= 0.5  # stripes
    assert metrics.detail_energy(textured, mask) > 0.05
    assert np.isnan(metrics.detail_energy(flat, torch.zeros_like(mask)))


def test_quality_plan_prompts_are_valid_and_balanced(tmp_path):
    from lods.priors.toy.world import parse_caption

    prompts = [p for ps in quality.QUALITY_PROMPTS.values() for p in ps]
    assert len(prompts) == len(set(prompts)) == 24
    assert all(not parse_caption(p).held_out for p in prompts)
    assert {quality.category_of(p) for p in quality.QUICK_PROMPTS} == set(quality.QUALITY_PROMPTS)
    jobs = quality.plan(quick=False, seeds=2, steps=10, out=tmp_path)
    assert len(jobs) == 2 * (24 * (len(quality.VARIANTS) + len(quality.WEIGHT_SWEEP)) + 3 * len(quality.LR_SWEEP))
    assert {j.config["cfg"] for j in jobs if j.config["method"] == "sds-norm"} == {100.0, 1e4, float("inf")}
    anneal = [j.config for j in jobs if j.config["method"] == "cfg-anneal"]
    assert anneal and all(c["guidance"]["anneal_steps"] == c["steps"] == 10 for c in anneal)  # within the run
    assert len({j.out for j in jobs}) == len(jobs)
    per_prompt = len(quality.VARIANTS) + len(quality.WEIGHT_SWEEP) + len(quality.LR_SWEEP)
    first = [j.config["prompt"] for j in jobs[: 3 * per_prompt]]
    assert {quality.category_of(p) for p in first} == set(quality.QUALITY_PROMPTS)  # interleaved categories


def test_quality_benchmark_writes_results_report_and_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "QUICK_PROMPTS", ["a red cube"])
    by = {v.label: v for v in quality.VARIANTS}
    monkeypatch.setattr(quality, "QUICK_VARIANTS", [by["SDS 7.5"], by["LODS-embed 100"]])
    out = tmp_path / "q"
    rows = quality.run_quality(out, quick=True, seeds=1, steps=2, lr_sweep=False)
    assert len(rows) == 2
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:8] == ["method", "cfg", "prompt", "seed", "alignment", "saturation_error",
                                  "artifact_score", "floater_score"]
    assert {r["method"] for r in table} == {"sds", "lods-embed"}
    report = (out / "report.md").read_text()
    assert "| SDS 7.5 | 1 |" in report and "| LODS-embed 100 | 1 |" in report
    assert (out / "grid.png").exists()
    first = json.loads(next(out.rglob("quality.json")).read_text())
    assert 0 <= first["alignment"] <= 1 and 0 <= first["floater_score"] <= 1 and 0 <= first["floater_hard"] <= 1
    assert "## The paper's claims on this world, paired per prompt" in report
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("quality.json")}
    quality.run_quality(out, quick=True, seeds=1, steps=2, lr_sweep=False)  # resumes: nothing re-runs
    assert {p: p.stat().st_mtime_ns for p in out.rglob("quality.json")} == stamp


def test_quality_plan_file_runs_the_declared_subset(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"prompts": ["a red cube"], "variants": ["ISM 100", "LODS-embed inf"],
                                "seeds": [3], "steps": 2, "steps_by_variant": {"ISM 100": 1}}))
    out = tmp_path / "q"
    assert main(["bench", "quality", "--plan", str(plan), "--out", str(out)]) == 0
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert sorted((r["variant"], r["seed"]) for r in table) == [("ISM 100", "3"), ("LODS-embed inf", "3")]
    assert float(next(r["cfg"] for r in table if r["method"] == "lods-embed")) == float("inf")
    assert {r["variant"]: int(r["steps"]) for r in table} == {"ISM 100": 1, "LODS-embed inf": 2}  # same wall clock
    for bad, needle in (({"prompts": ["a red cube"], "variants": ["SDS 5"], "seeds": [0], "steps": 2}, "SDS 5"),
                        ({"prompts": ["a plaid cube"], "variants": ["SDS 100"], "seeds": [0], "steps": 2}, "plaid"),
                        ({"prompts": ["a red cube"]}, "variants"),
                        ({"prompts": ["a red cube"], "variants": ["SDS 100"], "seeds": [0], "steps": 2,
                          "steps_by_variant": {"ISM 100": 3}}, "steps_by_variant")):
        plan.write_text(json.dumps(bad))
        capsys.readouterr()
        assert main(["bench", "quality", "--plan", str(plan), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err


def _tiny_argv(tiny_sd_dir):
    return ["--prior", str(tiny_sd_dir), "--backbone", "image", "--steps", "2", "--device", "cpu"]


def test_batch_writes_one_folder_per_prompt_and_method_and_resumes(tiny_sd_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red cube\n\na blue sphere\n")
    assert read_prompts(prompts) == ["a red cube", "a blue sphere"]
    out = tmp_path / "batch"
    argv = ["batch", "--prompts", str(prompts), "--methods", "sds,lods-embed", *_tiny_argv(tiny_sd_dir), "--out",
            str(out)]
    assert main(argv) == 0
    summaries = sorted(out.glob("*/*/summary.json"))
    assert len(summaries) == 4
    assert {json.loads(s.read_text())["method"] for s in summaries} == {"sds", "lods-embed"}
    with (out / "batch.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    stamps = {s: s.stat().st_mtime_ns for s in summaries}
    summaries[0].unlink()  # one run lost: only that one runs again
    capsys.readouterr()
    assert main(argv) == 0
    assert "3 already done, 1 to run" in capsys.readouterr().out
    assert all(s.stat().st_mtime_ns == stamps[s] for s in summaries[1:])
    assert summaries[0].exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--methods", "sds,nope"], "unknown method"),
        (["--methods", "sds", "--prompts", "/nonexistent.txt"], "not found"),
    ],
)
def test_batch_bad_input_is_one_line(tiny_sd_dir, tmp_path, capsys, extra, needle):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n")
    argv = ["batch", "--prompts", str(prompts), *_tiny_argv(tiny_sd_dir), "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_ray_executor_on_a_local_cluster(tmp_path):
    """Ray's ``local_mode`` is gone from current Ray, so this starts a single-node Ray instance on this machine
    (CPU, 2 workers) and runs two toy-prior jobs as Ray tasks."""
    ray = pytest.importorskip("ray")
    jobs = [
        Job({"prompt": p, "prior": "toy", "backbone": "image", "method": "sds", "steps": 2, "device": "cpu",
             "batch": 1}, str(tmp_path / slug(p)))
        for p in ("a red cube", "a blue sphere")
    ]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])}})
    try:
        results = dict((j.out, r) for j, r in map_jobs(_batch_job, jobs, "ray"))
    finally:
        ray.shutdown()
    assert set(results) == {j.out for j in jobs}
    for job in jobs:
        assert not isinstance(results[job.out], BaseException), results[job.out]
        assert results[job.out]["status"] == "done" and results[job.out]["prompt"] == job.config["prompt"]
        assert is_done(job.out)


def test_sweep_writes_grid_and_table(tiny_sd_dir, tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", "--prompt", "a red cube", "--methods", "sds,lods-embed", "--cfg", "7.5,inf",
            *_tiny_argv(tiny_sd_dir), "--out", str(out)]
    assert main(argv) == 0
    with (out / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    # SDS diverges at an infinite weight: that cell is skipped (left blank in the grid), the others run.
    assert [(r["method"], float(r["cfg"])) for r in rows] == [
        ("sds", 7.5), ("lods-embed", 7.5), ("lods-embed", float("inf"))]
    assert not (out / "sds" / "cfg-inf").exists()
    import imageio.v2 as imageio

    grid = imageio.imread(out / "grid.png")
    cell = imageio.imread(out / "sds" / "cfg-7.5" / "image.png").shape[0]
    assert grid.shape[0] == 2 * (cell + 2) + 2 and grid.shape[1] == 2 * (cell + 2) + 2
    assert (out / "table.md").read_text().count("\n| ") >= 4


@pytest.mark.parametrize("cfg", ["7.5,abc", "0.5", ","])
def test_sweep_rejects_bad_cfg_lists(tiny_sd_dir, tmp_path, capsys, cfg):
    argv = ["sweep", "--prompt", "a red cube", "--cfg", cfg, *_tiny_argv(tiny_sd_dir), "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1


def test_bench_speed_reports_phases(tiny_sd_dir, tmp_path):
    out = tmp_path / "speed"
    argv = ["bench", "speed", "--prior", str(tiny_sd_dir), "--backbones", "image,gs", "--methods", "sds,lods-embed",
            "--steps", "2", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "speed.json").read_text())
    rows = {(r["backbone"], r["method"]): r for r in report["rows"]}
    assert set(rows) == {("image", "sds"), ("image", "lods-embed"), ("gs", "sds"), ("gs", "lods-embed")}
    for r in rows.values():
        # UNet time over step time: up to 2 with the second thread (LODS-embed's update runs beside the next render)
        assert r["it_per_s"] > 0 and r["peak_memory_mb"] > 0 and 0 < r["unet_share"] <= 2.0 + 1e-6
        assert r["phases_ms"]["unet_forward"] > 0
    assert rows[("gs", "sds")]["phases_ms"]["render"] > 0 and rows[("gs", "sds")]["phases_ms"]["encode"] > 0
    assert rows[("gs", "lods-embed")]["phases_ms"]["unet_backward"] > 0  # the embedding's update
    # SDS: one batched (conditional, unconditional) call per step; LODS-embed adds the update's forward.
    assert rows[("gs", "sds")]["unet_forward_calls_per_step"] == 1
    assert rows[("gs", "lods-embed")]["unet_forward_calls_per_step"] == 2
    assert report["second_thread"] is True
    assert "| gs | lods-embed |" in (out / "speed.md").read_text()


@pytest.mark.parametrize("switch", ["trace", "early"])
def test_speed_ab_times_both_arms_of_one_run(tiny_sd_dir, switch):
    from benchmarks.speed_ab import speed_ab

    (row,) = speed_ab(switch, ["image"], ["lods-embed"], blocks=2, block=2, prior_name=str(tiny_sd_dir))
    assert row["traced"] and len(row["on_blocks"]) == len(row["off_blocks"]) == 2
    assert row["on_it_s"] > 0 and row["off_it_s"] > 0


def test_read_views_inverts_the_grid(tmp_path):
    from lods.export import image_grid, write_png

    views = torch.rand(3, 3, 8, 8)
    write_png(tmp_path / "v.png", image_grid(views, cols=3))
    back = read_views(tmp_path / "v.png")
    assert back.shape == (3, 8, 8, 3)
    assert np.abs(back.astype(float) / 255 - views.permute(0, 2, 3, 1).numpy()).max() < 1 / 255 + 1e-6


def test_clip_score_is_skipped_cleanly_without_local_weights(monkeypatch, tmp_path):
    from lods import clip_score
    from lods.runs import alignment_metrics

    monkeypatch.delenv("LODS_CLIP_WEIGHTS", raising=False)
    assert clip_score.unavailable_reason() == "LODS_CLIP_WEIGHTS is not set"
    assert clip_score.clip_scorer() is None
    assert alignment_metrics("a photo of a hamburger", "sd21", torch.rand(2, 3, 32, 32)) == {}
    monkeypatch.setenv("LODS_CLIP_WEIGHTS", str(tmp_path / "missing.bin"))
    assert "is not a file" in clip_score.unavailable_reason()
    assert clip_score.clip_scorer() is None


def test_job_claims_let_processes_share_a_batch(tmp_path):
    import os

    from lods.runs.batch import claim, release_claim

    folder = tmp_path / "job"
    assert claim(folder) and claim(folder)  # this process holds it (a second claim is harmless)
    assert (folder / ".claim").read_text() == str(os.getpid())
    (folder / ".claim").write_text("1")  # held by a live process (init)
    assert not claim(folder)
    (folder / ".claim").write_text(str(2**22 + 12345))  # a holder that is gone: taken over
    assert claim(folder) and (folder / ".claim").read_text() == str(os.getpid())
    release_claim(folder)
    assert not (folder / ".claim").exists()


def test_splats_fitted_to_one_world_scene_reproduce_its_views():
    """The judge-on-splats check fits splats to views of one scene (the same placement in every view)."""
    from lods.bench.judge_splats import fit_splats, world_views
    from lods.cameras import sample_cameras, turntable

    cams = sample_cameras(6, 32, generator=torch.Generator().manual_seed(0))
    rgb, alpha = world_views("a red cube and a blue sphere", cams, seed=3)
    again, _ = world_views("a red cube and a blue sphere", cams[torch.tensor([2, 0])], seed=3)
    assert torch.equal(again, rgb[torch.tensor([2, 0])])  # the same scene whichever views are asked for
    test = turntable(2, 32)
    truth, _ = world_views("a red cube and a blue sphere", test, seed=3)
    white = torch.ones(2, 3)
    from lods.scenes.gaussians import GaussianConfig, GaussianScene

    untrained = GaussianScene(GaussianConfig(num_points=2000), generator=torch.Generator().manual_seed(3))
    fitted = fit_splats(rgb, cams, steps=60, seed=3)
    with torch.no_grad():
        before = (untrained.render(test, white).rgb - truth).square().mean()
        after = (fitted.render(test, white).rgb - truth).square().mean()
    assert after < 0.5 * before  # held-out views: the fit learned the scene, not the training views alone
