"""The trainer and the CLI on the 2D backbone with a tiny random prior: files, resume, knobs, errors."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lods import checkpoint
from lods.__main__ import main
from lods.errors import UserError
from lods.priors.diffusers_prior import DiffusersPrior
from lods.trainer import RunConfig, Trainer


@pytest.fixture(scope="module")
def tiny_prior(tiny_sd_dir):
    return DiffusersPrior.from_pretrained(str(tiny_sd_dir))


def image_config(**kw):
    base = dict(
        prompt="a red cube",
        prior="tiny",
        backbone="image",
        method="lods-embed",
        cfg=100.0,
        steps=6,
        seed=0,
        device="cpu",
        batch=1,
        learned_lr=1e-3,
        snapshot_every=2,
        checkpoint_every=3,
    )
    base.update(kw)
    return RunConfig(**base)


def test_generate_image_writes_the_contract_files(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "generate",
            "--prompt",
            "a red cube",
            "--backbone",
            "image",
            "--prior",
            str(tiny_sd_dir),
            "--method",
            "lods-embed",
            "--steps",
            "4",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.safetensors", "image.png"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "lods-embed" and summary["cfg"] == 100 and summary["steps"] == 4
    assert summary["it_per_s"] > 0 and summary["seconds"] > 0
    assert set(summary["final_metrics"]) >= {"saturation", "value", "clipped"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all("update_loss" in r and "embedding_distance" in r for r in rows)
    assert Image.open(out / "image.png").size == (16, 16)


def test_resume_continues_exactly(tiny_prior, tmp_path):
    full = Trainer(image_config(steps=6), prior=tiny_prior, out_dir=tmp_path / "full")
    full.run()
    first = Trainer(image_config(steps=3), prior=tiny_prior, out_dir=tmp_path / "half")
    first.run()
    second = Trainer(image_config(steps=6), prior=tiny_prior, out_dir=tmp_path / "half")
    second.load_checkpoint(tmp_path / "half" / "checkpoint.safetensors")
    assert second.step == 3
    second.run()
    assert torch.equal(full.scene.theta, second.scene.theta)
    assert torch.equal(full.estimator.alpha, second.estimator.alpha)


def test_knob_changes_apply_next_step_and_are_recorded(tiny_prior):
    tr = Trainer(image_config(steps=4, learned_lr=1e-3), prior=tiny_prior)
    tr.train_step()
    tr.set_knobs(cfg=7.5, learned_lr=2e-3, lr_scale=0.5)
    stats = tr.train_step()
    assert stats["cfg"] == 7.5 and stats["learned_lr"] == 2e-3
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(tr.base_lrs["image"] * 0.5)
    assert [c["knob"] for c in tr.knob_changes] == ["cfg", "learned_lr", "lr_scale"]
    assert tr.knob_changes[0] == {"step": 1, "knob": "cfg", "old": 100.0, "new": 7.5}
    for bad in (
        dict(cfg=float("nan")),
        dict(cfg=0.5),
        dict(learned_lr=-1.0),
        dict(learned_lr=float("inf")),
        dict(lr_scale=1e6),
        dict(t_max=2.0),
    ):
        with pytest.raises(UserError):
            tr.set_knobs(**bad)
    assert tr.knobs.cfg == 7.5


def test_stop_and_pause_from_another_thread(tiny_prior):
    import threading

    tr = Trainer(image_config(steps=100000), prior=tiny_prior)
    tr.pause()
    th = threading.Thread(target=tr.run)
    th.start()
    th.join(0.3)
    assert th.is_alive() and tr.step == 0  # paused before the first step
    tr.resume()
    while tr.step < 3:
        th.join(0.05)
    tr.stop()
    th.join(10)
    assert not th.is_alive() and tr.status == "stopped" and tr.latest() is not None


def test_divergence_guard_stops_and_keeps_last_checkpoint(tiny_prior, tmp_path):
    tr = Trainer(image_config(steps=10, checkpoint_every=2), prior=tiny_prior, out_dir=tmp_path)
    original = tr.estimator.step

    def poisoned(z, *a, **k):
        out = original(z, *a, **k)
        if tr.step == 5:
            with torch.no_grad():
                tr.scene.theta.fill_(float("nan"))
        return out

    tr.estimator.step = poisoned
    assert tr.run() == "diverged"
    assert "diverged at step" in tr.message and "step 4" in tr.message
    ck = checkpoint.load(tmp_path / "checkpoint.safetensors")
    assert ck["step"] == 4 and torch.isfinite(ck["scene"]["theta"]).all()


@pytest.mark.parametrize("method", ["dds", "lods-embed"])
def test_edit(tiny_sd_dir, tmp_path, method):
    src = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(src)
    out = tmp_path / method
    code = main(
        [
            "edit",
            "--image",
            str(src),
            "--source-prompt",
            "a red cube",
            "--prompt",
            "a blue cube",
            "--method",
            method,
            "--prior",
            str(tiny_sd_dir),
            "--steps",
            "3",
            "--cfg",
            "7.5",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and (out / "image.png").exists()
    before = np.asarray(Image.open(src), dtype=np.float32)
    after = np.asarray(Image.open(out / "image.png"), dtype=np.float32)
    assert after.shape == before.shape


def test_edit_starts_learnable_embedding_at_source_caption(tiny_prior):
    img = torch.rand(1, 3, 16, 16)
    tr = Trainer(
        image_config(method="lods-embed", source_prompt="a red cube", prompt="a blue cube", steps=1),
        prior=tiny_prior,
        init_image=img,
    )
    tr.train_step()
    assert torch.allclose(tr.estimator.alpha_init, tiny_prior.encode_text(["a red cube"]).float())


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--prompt", "  "], "prompt is empty"),
        (["--prompt", "a cube", "--method", "magic"], "unknown method"),
        (["--prompt", "a cube", "--cfg", "nan"], "CFG weight"),
        (["--prompt", "a cube", "--cfg", "-3"], "CFG weight"),
        (["--prompt", "a cube", "--learned-lr", "nan"], "learning rate"),
        (["--prompt", "a cube", "--learned-lr", "-1"], "learning rate"),
        (["--prompt", "a cube", "--backbone", "voxels"], "unknown backbone"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tiny_sd_dir, tmp_path, capsys, argv, needle):
    backbone = [] if "--backbone" in argv else ["--backbone", "image"]
    code = main(
        ["generate", *argv, *backbone, "--prior", str(tiny_sd_dir), "--steps", "1", "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and needle in err and "\n" not in err


def test_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    code = main(
        [
            "generate",
            "--prompt",
            "a cube",
            "--backbone",
            "image",
            "--prior",
            str(tmp_path / "notamodel"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a Stable-Diffusion-format diffusers folder" in err and "\n" not in err


def test_inf_cfg_runs_for_lods(tiny_prior):
    tr = Trainer(image_config(cfg=math.inf, steps=2), prior=tiny_prior)
    assert tr.run() == "done"
    assert math.isinf(tr.history[-1]["cfg"])


def test_inf_cfg_is_refused_up_front_where_it_diverges(tiny_prior):
    for method in ("sds", "cfg-anneal", "vsd"):
        with pytest.raises(UserError, match="infinite CFG"):
            image_config(method=method, cfg=math.inf).validate()
    tr = Trainer(image_config(method="sds", cfg=7.5, steps=2), prior=tiny_prior)
    with pytest.raises(UserError, match="infinite CFG"):
        tr.set_knobs(cfg=math.inf)
    assert tr.knobs.cfg == 7.5 and tr.run() == "done"


def test_cfg_anneal_reaches_its_end_weight_within_the_run(tiny_prior):
    tr = Trainer(image_config(method="cfg-anneal", cfg=100.0, steps=4), prior=tiny_prior)
    assert tr.estimator.config.anneal_steps == 4
    assert tr.run() == "done"
    assert tr.history[-1]["cfg"] < 100.0 and tr.estimator.cfg_at(100.0, 4) == tr.estimator.config.cfg_end


def test_bench_guidance_counts_match_fig3(tiny_prior):
    from lods.bench.guidance import bench_guidance

    rows = {r["method"]: r for r in bench_guidance(tiny_prior, steps=1)}
    sds, lods_e, lods_l, vsd = rows["sds"], rows["lods-embed"], rows["lods-lora"], rows["vsd"]
    for lods_row in (lods_e, lods_l):
        assert lods_row["unet_forward"] == sds["unet_forward"] + 1
        assert lods_row["unet_backward"] == sds["unet_backward"] + 1
    assert vsd["unet_forward"] + vsd["unet_backward"] > lods_e["unet_forward"] + lods_e["unet_backward"]
    assert all(r["seconds_per_step"] > 0 for r in rows.values())


def test_example_configs_are_valid_run_configs():
    from pathlib import Path

    import yaml

    files = sorted((Path(__file__).parent.parent / "examples" / "configs").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        cfg = RunConfig.from_dict({"prompt": "a red cube", **yaml.safe_load(f.read_text())})
        cfg.validate()
        from lods.guidance import GuidanceConfig

        assert isinstance(cfg.guidance, GuidanceConfig)  # sections are typed as they load
