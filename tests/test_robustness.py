"""Hostile and careless input: one ``error:`` line and exit status 2, nothing run that was not asked for,
nothing lost. Checkpoints are never unpickled; resume is exact; a divergence leaves earlier results alone."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lods import checkpoint
from lods.__main__ import main
from lods.errors import UserError
from lods.guidance import METHODS
from lods.priors.diffusers_prior import DiffusersPrior
from lods.trainer import RunConfig, Trainer

SMALL_GS = {"num_points": 200, "densify_from": 1, "densify_every": 4, "densify_until": 100, "grad_threshold": 1e-9,
            "max_points": 900}
SMALL_NERF = {"samples_per_ray": 16, "grid": {"n_levels": 4, "log2_hashmap_size": 10}}


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in this process; returns (exit status, stderr). An uncaught exception fails the test."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, needle: str = "") -> None:
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "%|" not in line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert needle.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def tiny_prior(tiny_sd_dir):
    return DiffusersPrior.from_pretrained(str(tiny_sd_dir))


@pytest.fixture(scope="module")
def finished_run(tiny_sd_dir, tmp_path_factory) -> Path:
    """A finished 2-step Gaussian-splat LODS-embed run on the tiny prior, with its checkpoints."""
    out = tmp_path_factory.mktemp("finished") / "run"
    code = main(["generate", "--prompt", "a red cube", "--prior", str(tiny_sd_dir), "--steps", "2", "--device", "cpu",
                 "--set", "batch=1", "checkpoint_every=1", "gaussians.num_points=100", "--out", str(out)])
    assert code == 0
    return out


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data): a decompression bomb's calling card."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def bad_inputs(tmp: Path, prior: str, finished: Path) -> list[tuple[list[str], str]]:
    """(argv, a word the error line must contain) for every class of bad input of every subcommand."""
    a_file = tmp / "a_file.txt"
    a_file.write_text("not a folder")
    png = tmp / "in.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(png)
    truncated = tmp / "truncated.png"
    truncated.write_bytes(png.read_bytes()[:40])
    bomb = png_header_only(tmp / "bomb.png", 40_000, 40_000)
    list_yaml = tmp / "list.yaml"
    list_yaml.write_text("- 1\n- 2\n")
    not_yaml = tmp / "bad.yaml"
    not_yaml.write_text("prompt: [unclosed\n")
    binary = tmp / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    empty_ck, trunc_ck = tmp / "empty_ck", tmp / "trunc_ck"
    for d in (empty_ck, trunc_ck):
        shutil.copytree(finished, d)
    (empty_ck / checkpoint.LATEST).write_bytes(b"")
    data = (trunc_ck / checkpoint.LATEST).read_bytes()
    (trunc_ck / checkpoint.LATEST).write_bytes(data[: len(data) // 2])
    prompts_dir = tmp / "prompts_dir"
    prompts_dir.mkdir()
    out = str(tmp / "out")
    g = ["generate", "--prompt", "a red cube", "--prior", prior, "--device", "cpu", "--out", out]
    e = ["edit", "--source-prompt", "a red cube", "--prompt", "a blue cube", "--prior", prior, "--device", "cpu",
         "--out", out]
    r = ["generate", "--prompt", "a red cube", "--resume", str(finished), "--out", str(tmp / "resumed")]
    return [
        # generate: flags
        (g + ["--device", "tpu"], "device"),
        (g + ["--device", "cuda:x"], "device"),
        (g + ["--steps", "0"], "steps"),
        (g + ["--steps", "abc"], "steps"),
        (g + ["--steps", "99999999999"], "steps"),
        (g + ["--seed", "-1"], "seed"),
        (g + ["--seed", str(2**32 + 1)], "seed"),
        (g + ["--cfg", "abc"], "cfg"),
        (g + ["--cfg", "nan"], "CFG weight"),
        (g + ["--cfg", "0.5"], "CFG weight"),
        (g + ["--cfg", "inf", "--method", "sds"], "infinite"),
        (g + ["--lr", "nan"], "learning"),
        (g + ["--lr", "1e9"], "learning"),
        (g + ["--learned-lr", "-1"], "learning"),
        (g + ["--method", "magic"], "unknown method"),
        (g + ["--backbone", "voxels"], "unknown backbone"),
        (["generate", "--prompt", "   ", "--out", out], "prompt is empty"),
        (["generate", "--prompt", "x" * 1001, "--out", out], "longer than"),
        (g + ["--method", "dds"], "edit"),
        # generate: --set and --config
        (g + ["--set", "steps=abc"], "steps"),
        (g + ["--set", "batch=abc"], "batch"),
        (g + ["--set", "batch=0"], "batch"),
        (g + ["--set", "prompt=123"], "prompt"),
        (g + ["--set", "lr=5"], "lr"),
        (g + ["--set", "lr.means=abc"], "lr"),
        (g + ["--set", "seed=-1"], "seed"),
        (g + ["--set", "resolution=-8"], "resolution"),
        (g + ["--set", "resolution=20"], "multiple of 8"),
        (g + ["--set", "snapshot_every=0"], "snapshot_every"),
        (g + ["--set", "log_every=0"], "log_every"),
        (g + ["--set", "checkpoint_every=-1"], "checkpoint_every"),
        (g + ["--set", "preview_views=0"], "preview_views"),
        (g + ["--set", "threads=0"], "threads"),
        (g + ["--set", "background=purple"], "background"),
        (g + ["--set", "max_grad_norm_jump=0"], "max_grad_norm_jump"),
        (g + ["--set", "no_such_key=1"], "no_such_key"),
        (g + ["--set", "gaussians.nope=1"], "gaussians.nope"),
        (g + ["--set", "gaussians.num_points=abc"], "gaussians.num_points"),
        (g + ["--set", "guidance.schedule.min_frac=abc"], "guidance.schedule.min_frac"),
        (g + ["--set", "camera.fovy=5"], "camera.fovy"),
        (g + ["--set", "nerf.grid.n_levels=many"], "nerf.grid.n_levels"),
        (g + ["--set", "gaussians=7"], "gaussians"),
        (g + ["--set", "steps"], "KEY=VALUE"),
        (g + ["--set", "steps=[unclosed"], "steps"),
        (g + ["--config", str(tmp)], "not a file"),
        (g + ["--config", str(tmp / "missing.yaml")], "not found"),
        (g + ["--config", str(list_yaml)], "mapping"),
        (g + ["--config", str(not_yaml)], "YAML"),
        (g + ["--config", str(binary)], "text"),
        # generate: --out
        (g[:-1] + [str(a_file)], "is a file"),
        (g[:-1] + [str(a_file / "under")], "is a file"),
        # generate: --resume
        (g + ["--resume", str(tmp / "nowhere")], "not found"),
        (g + ["--resume", str(prompts_dir)], "no checkpoint"),
        (r + ["--backbone", "nerf"], "backbone cannot change"),
        (r + ["--method", "sds"], "method cannot change"),
        (r + ["--set", "gaussians.num_points=50"], "gaussians cannot change"),
        (r + ["--seed", "3"], "seed cannot change"),
        (["generate", "--prompt", "a red cube", "--resume", str(empty_ck), "--out", str(empty_ck)], "damaged"),
        (["generate", "--prompt", "a red cube", "--resume", str(trunc_ck), "--out", str(trunc_ck)], "damaged"),
        (["generate", "--prompt", "a red cube", "--resume", str(png), "--out", out], "checkpoint"),
        # edit
        (e + ["--image", str(tmp)], "not a file"),
        (e + ["--image", str(tmp / "missing.png")], "not found"),
        (e + ["--image", str(a_file)], "not an image"),
        (e + ["--image", str(truncated)], "image"),
        (e + ["--image", str(bomb)], "too large"),
        (e + ["--image", str(png), "--set", "steps=abc"], "steps"),
        # sweep and batch
        (["sweep", "--prompt", "a red cube", "--cfg", "abc", "--prior", prior, "--out", out], "cfg"),
        (["sweep", "--prompt", "a red cube", "--cfg", "nan", "--prior", prior, "--out", out], "CFG"),
        (["sweep", "--prompt", "a red cube", "--cfg", "100", "--methods", "magic", "--prior", prior, "--out", out],
         "magic"),
        (["sweep", "--prompt", "a red cube", "--cfg", "100", "--steps", "-3", "--out", out], "steps"),
        (["batch", "--prompts", str(tmp / "missing.txt"), "--methods", "sds", "--out", out], "missing.txt"),
        (["batch", "--prompts", str(prompts_dir), "--methods", "sds", "--out", out], "prompts_dir"),
        (["batch", "--prompts", str(a_file), "--methods", "sds", "--limit", "-1", "--out", out], "limit"),
        (["batch", "--prompts", str(a_file), "--methods", "sds", "--limit", "0", "--out", out], "limit"),
        (["batch", "--prompts", str(a_file), "--methods", "magic", "--out", out], "magic"),
        # bench and toy-prior
        (["bench", "speed", "--steps", "0"], "steps"),
        (["bench", "quality", "--seeds", "0"], "seeds"),
        (["bench", "nothing"], "invalid choice"),
        (["toy-prior", "sample", "--prompt", " ", "--out", out], "prompt is empty"),
        (["toy-prior", "sample", "--prompt", "a red cube", "--n", "0", "--out", out], "--n"),
        (["toy-prior", "sample", "--prompt", "a red cube", "--cfg", "nan", "--out", out], "--cfg"),
        (["toy-prior", "train", "--unet-lr", "nan", "--cache", str(tmp)], "unet-lr"),
        (["toy-prior", "train", "--unet-minutes", "-5", "--cache", str(tmp)], "unet-minutes"),
        (["toy-prior", "render", "--n", "-5", "--out", out], "--n"),
        (["nothing"], "invalid choice"),
    ]


def test_bad_inputs_end_in_one_error_line_and_leave_nothing(tiny_sd_dir, finished_run, tmp_path, capsys):
    cases = bad_inputs(tmp_path, str(tiny_sd_dir), finished_run)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    finished_files = {p.name: p.read_bytes() for p in finished_run.iterdir()}
    assert len(cases) >= 85
    for argv, needle in cases:
        code, err = cli(argv, capsys)
        assert_one_error_line(code, err, needle)
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    # Nothing new and nothing touched, except empty folders (--out made before a prior failed to load).
    new = [p for p in after if p not in before and not (p.is_dir() and not any(p.iterdir()))]
    assert new == []
    assert {p: after[p] for p in before} == before
    assert {p.name: p.read_bytes() for p in finished_run.iterdir()} == finished_files


def test_the_viewer_refuses_bad_files_in_one_line(tmp_path, capsys):
    from viewer.__main__ import main as viewer_main

    bad_ply = tmp_path / "scene.ply"
    bad_ply.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nend_header\n1\n")
    png = tmp_path / "pic.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png)
    glb = tmp_path / "mesh.glb"
    glb.write_bytes(b"glTF garbage")
    for target, needle in ((bad_ply, "scene.ply"), (tmp_path, "scene.ply"), (png, "not a result file"),
                           (glb, "mesh.glb"), (tmp_path / "missing", "does not exist")):
        code = viewer_main([str(target), "--port", "0"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


class _Payload:
    """Pickles to a call that creates a marker file: what a hostile checkpoint.pt would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(finished_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile"
    shutil.copytree(finished_run, hostile)
    for name in (checkpoint.LATEST, checkpoint.PREVIOUS):
        (hostile / name).unlink()
    torch.save({"step": 1, "x": _Payload(marker)}, hostile / "checkpoint.pt")
    code, err = cli(["generate", "--prompt", "a red cube", "--resume", str(hostile), "--out", str(hostile)], capsys)
    assert_one_error_line(code, err, "pickle")
    # The same bytes under the new name, and pointed at directly.
    (hostile / "checkpoint.pt").rename(hostile / checkpoint.LATEST)
    for target in (hostile, hostile / checkpoint.LATEST):
        code, err = cli(["generate", "--prompt", "a red cube", "--resume", str(target), "--out", str(hostile)],
                        capsys)
        assert_one_error_line(code, err, "damaged")
    assert not marker.exists()


def test_checkpoint_roundtrip_keeps_types_and_the_previous_file(tmp_path):
    state = {"step": 3, "config": {"a": 1}, "t": torch.arange(4.0), "n": np.arange(3, dtype=np.uint32),
             "tup": (1, (2.5, None), "x"), "ints": {0: {"m": torch.ones(2)}, 7: {}}, "inf": float("inf")}
    path = checkpoint.save(tmp_path / checkpoint.LATEST, state)
    checkpoint.save(path, {**state, "step": 4})
    back = checkpoint.load(tmp_path)
    prev = checkpoint.load(tmp_path / checkpoint.PREVIOUS)
    assert back["step"] == 4 and prev["step"] == 3
    assert torch.equal(back["t"], state["t"]) and back["n"].dtype == np.uint32
    assert back["tup"] == (1, (2.5, None), "x") and set(back["ints"]) == {0, 7}
    assert torch.equal(back["ints"][0]["m"], torch.ones(2)) and back["inf"] == float("inf")
    with pytest.raises(TypeError):
        checkpoint.save(tmp_path / "other.safetensors", {"step": 0, "config": {}, "f": lambda: 0})


def config(backbone: str, method: str, steps: int, **kw) -> RunConfig:
    base = dict(prompt="a red cube", prior="tiny", backbone=backbone, method=method, cfg=100.0, steps=steps, seed=0,
                device="cpu", batch=1 if backbone != "gs" else 2, learned_lr=1e-3, snapshot_every=1000,
                checkpoint_every=1000, gaussians=SMALL_GS, nerf=SMALL_NERF)
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.parametrize(
    "backbone, method",
    [("gs", "lods-embed"), ("gs", "sds"), ("nerf", "lods-lora"), ("image", "vsd"), ("image", "cfg-anneal")],
)
def test_kill_and_resume_is_bit_identical(tiny_prior, tmp_path, backbone, method):
    """Stopped after step 3 (between densifications for Gaussians: their statistics must travel) and resumed
    from the checkpoint file alone in a fresh trainer, the run ends where an uninterrupted one ends."""
    total, cut = 7, 3
    full = Trainer(config(backbone, method, total), prior=tiny_prior)
    full.run()
    full.close()
    first = Trainer(config(backbone, method, total), prior=tiny_prior, out_dir=tmp_path)
    first.begin()
    while first.step < cut:  # killed after step 3 (the same run, not a shorter one)
        first.advance()
    first.save_checkpoint(tmp_path)
    first.close()
    del first  # only the file goes on
    again = Trainer(config(backbone, method, total), prior=tiny_prior, out_dir=tmp_path)
    again.load_checkpoint(tmp_path)
    assert again.step == cut
    again.run()
    again.close()
    a, b = dict(full.scene.named_parameters()), dict(again.scene.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if backbone == "gs":
        assert full.scene.num_gaussians > SMALL_GS["num_points"]  # densification happened after the cut
    for (k, x), (_, y) in zip(full.estimator.state_dict().items(), again.estimator.state_dict().items()):
        if k == "params":
            assert all(torch.equal(p, q) for p, q in zip(x, y)), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in again.history]


@pytest.mark.parametrize("method", sorted(m for m in METHODS if m != "dds"))
def test_every_estimator_resumes_exactly_on_the_image_backbone(tiny_prior, tmp_path, method):
    cfg = {"cfg": float("inf")} if method in ("sds-norm",) else {}
    full = Trainer(config("image", method, 5, **cfg), prior=tiny_prior)
    full.run()
    full.close()
    first = Trainer(config("image", method, 5, **cfg), prior=tiny_prior, out_dir=tmp_path)
    first.begin()
    while first.step < 2:
        first.advance()
    first.save_checkpoint(tmp_path)
    first.close()
    again = Trainer(config("image", method, 5, **cfg), prior=tiny_prior, out_dir=tmp_path)
    again.load_checkpoint(tmp_path / checkpoint.LATEST)
    again.run()
    again.close()
    assert torch.equal(full.scene.theta, again.scene.theta)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in again.history]


def test_resume_overrides_apply_and_are_recorded(tiny_sd_dir, finished_run, tmp_path, capsys):
    out = tmp_path / "more"
    shutil.copytree(finished_run, out)
    code, err = cli(["generate", "--prompt", "a red cube", "--resume", str(out), "--steps", "4", "--cfg", "7.5",
                     "--set", "lr.means=0.02", "--out", str(out)], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["cfg_knob"] for r in rows] == [100.0, 100.0, 7.5, 7.5]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cfg"] == 7.5 and summary["knob_changes"] == [{"step": 2, "knob": "cfg", "old": 100.0,
                                                                  "new": 7.5}]
    ck = checkpoint.load(out)
    lrs = {g["name"]: g["lr"] for g in ck["optimizer"]["param_groups"]}
    assert lrs["means"] == 0.02 and ck["step"] == 4
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["cfg"] == 7.5


def test_a_diverged_resume_leaves_the_previous_results_byte_identical(finished_run, tmp_path, capsys):
    out = tmp_path / "div"
    shutil.copytree(finished_run, out)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    code, err = cli(["generate", "--prompt", "a red cube", "--resume", str(out), "--steps", "5", "--set",
                     "lr.means=10", "lr.scales=10", "lr.opacities=10", "lr.colors=10", "lr.quats=10",
                     "--out", str(out)], capsys)
    assert_one_error_line(code, err, "diverged at step 3")
    assert "last good checkpoint is at step 2" in err
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == before
    # The override was not made sticky: a plain resume continues from the good state.
    code, err = cli(["generate", "--prompt", "a red cube", "--resume", str(out), "--steps", "3", "--out", str(out)],
                    capsys)
    assert code == 0, err


def test_a_fresh_diverged_run_writes_no_results_and_says_there_is_no_checkpoint(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "fresh"
    code, err = cli(["generate", "--prompt", "a red cube", "--prior", str(tiny_sd_dir), "--steps", "5",
                     "--device", "cpu", "--set", "batch=1", "gaussians.num_points=100", "lr.means=10", "lr.scales=10",
                     "--out", str(out)], capsys)
    assert_one_error_line(code, err, "nothing to resume")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_the_largest_learning_rates_end_in_a_clean_divergence_not_a_crash(tiny_prior, tmp_path):
    tr = Trainer(config("gs", "lods-embed", 10, lr={k: 10.0 for k in ("means", "scales", "opacities", "colors",
                                                                      "quats")}, checkpoint_every=1),
                 prior=tiny_prior, out_dir=tmp_path)
    assert tr.run() == "diverged"
    if tr.checkpoint_step is not None:  # whatever was saved passed the guard
        ck = checkpoint.load(tmp_path)
        assert ck["scene"]["log_scales"].exp().max() <= SMALL_GS.get("max_scale", 10.0)
        assert ck["scene"]["means"].abs().max() <= 100.0


def test_non_finite_projections_bin_no_pairs_instead_of_crashing():
    from lods.scenes.rasterize import _bin_pairs

    proj = {
        "depths": torch.tensor([[1.0, 2.0]]),
        "means2d": torch.tensor([[[8.0, 8.0], [float("nan"), 4.0]]]),
        "conics": torch.tensor([[[1.0, 0.0, 1.0], [float("nan"), 0.0, 1.0]]]),
        "opacities": torch.tensor([[0.9, 0.9]]),
        "cov_diag": torch.tensor([[[1.0, 1.0], [float("nan"), float("nan")]]]),
        "valid": torch.tensor([[True, True]]),
    }
    pairs = _bin_pairs(proj, 16, 16)
    assert len(pairs.pix) > 0 and set(pairs.order[pairs.src.long()].tolist()) == {0}


def test_a_full_disk_is_one_line(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    import lods.runs.generation

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "config.yaml"))

    monkeypatch.setattr(lods.runs.generation, "write_config", full)
    code, err = cli(["generate", "--prompt", "a red cube", "--prior", str(tiny_sd_dir), "--steps", "1", "--device",
                     "cpu", "--out", str(tmp_path / "run")], capsys)
    assert_one_error_line(code, err, "no space left")


def test_user_error_type_for_config_from_a_list():
    with pytest.raises(UserError, match="mapping"):
        RunConfig.from_dict([1, 2])


@pytest.mark.parametrize("backbone", ["gs", "image"])
def test_the_learned_update_in_its_own_thread_gives_the_same_numbers(tiny_prior, backbone):
    """LODS-embed's update (Algorithm 1, line 6) runs in a lane beside the next step's render on CPU; the run is
    bit-identical to one that runs it in line, every logged update included."""
    runs = {}
    for lane, early in ((False, False), (True, True), (True, False)):
        trainer = Trainer(config(backbone, "lods-embed", 6, second_thread=lane), prior=tiny_prior)
        assert (trainer._lane is not None) == lane == trainer._background_update
        trainer.update_early = early  # started before the guidance (the default), or after it
        trainer.run()
        trainer.close()
        runs[lane, early] = trainer
    inline, lane, late = runs[False, False], runs[True, True], runs[True, False]
    assert torch.equal(late.estimator.alpha, lane.estimator.alpha)
    for a, b in zip(late.scene.parameters(), lane.scene.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(inline.estimator.alpha, lane.estimator.alpha)
    assert not torch.equal(lane.estimator.alpha, lane.estimator.alpha_init)  # it learned
    for a, b in zip(inline.scene.parameters(), lane.scene.parameters()):
        assert torch.equal(a, b)
    keys = ("loss", "update_loss", "update_alpha_drift", "embedding_distance", "unet_forward", "update_unet_forward",
            "update_unet_backward")
    assert [[h[k] for k in keys] for h in inline.history] == [[h[k] for k in keys] for h in lane.history]
    # the update started before the guidance and ran beside its UNet forwards, each counting its own passes
    assert lane.estimator.update_beside_guidance
    assert {h["unet_forward"] for h in lane.history} == {2.0}
    assert {(h["update_unet_forward"], h["update_unet_backward"]) for h in lane.history} == {(1.0, 1.0)}
    assert tiny_prior.unet_call._graphs  # both ran the traced UNet


def test_a_run_with_learned_lora_never_shares_the_unet_with_a_lane(tiny_prior):
    from lods.runs.compare import Comparison

    configs = [config("image", "lods-embed", 2), config("image", "lods-lora", 2)]
    comparison = Comparison(configs, tiny_prior)
    try:
        assert all(t._lane is None for t in comparison.trainers)
    finally:
        comparison.close()
    comparison = Comparison([config("image", "lods-embed", 2), config("image", "sds", 2)], tiny_prior)
    try:
        assert comparison.trainers[0]._lane is not None
    finally:
        comparison.close()
