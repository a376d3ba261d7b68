"""Text-to-3D end to end on a tiny random prior: exports that other tools open, exact resume, SIGKILL safety."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lods import checkpoint
from lods.__main__ import main
from lods.errors import UserError
from lods.priors.diffusers_prior import DiffusersPrior
from lods.trainer import RunConfig, Trainer

SMALL_GS = {"num_points": 300, "densify_from": 2, "densify_every": 2, "densify_until": 100, "grad_threshold": 1e-9,
            "max_points": 1200}


@pytest.fixture(scope="module")
def tiny_prior(tiny_sd_dir):
    return DiffusersPrior.from_pretrained(str(tiny_sd_dir))


def gs_config(**kw):
    base = dict(prompt="a red cube", prior="tiny", backbone="gs", method="lods-embed", cfg=100.0, steps=6, seed=0,
                device="cpu", batch=2, learned_lr=1e-3, snapshot_every=3, checkpoint_every=3, gaussians=SMALL_GS)
    base.update(kw)
    return RunConfig(**base)


def test_generate_gs_exports(tiny_sd_dir, tmp_path):
    from plyfile import PlyData

    out = tmp_path / "gs"
    code = main(["generate", "--prompt", "a red cube", "--backbone", "gs", "--prior", str(tiny_sd_dir), "--steps", "4",
                 "--device", "cpu", "--set", "gaussians.num_points=300", "--set", "batch=1", "--out", str(out)])
    assert code == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.safetensors", "scene.ply", "views.png",
                 "turntable.mp4"):
        assert (out / name).exists(), name
    ply = PlyData.read(str(out / "scene.ply"))
    names = [p.name for p in ply["vertex"].properties]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert ply["vertex"].count == 300
    summary = json.loads((out / "summary.json").read_text())
    assert {"saturation", "floater_score"} <= set(summary["final_metrics"])
    import imageio.v3 as iio

    frames = iio.imread(out / "turntable.mp4")
    assert frames.shape[0] == 60 and frames.shape[-1] == 3


def test_gs_resume_is_exact_across_densification(tiny_prior, tmp_path):
    full = Trainer(gs_config(steps=6), prior=tiny_prior)
    full.run()
    half = Trainer(gs_config(steps=3), prior=tiny_prior, out_dir=tmp_path)
    half.run()
    again = Trainer(gs_config(steps=6), prior=tiny_prior, out_dir=tmp_path)
    again.load_checkpoint(tmp_path / "checkpoint.safetensors")
    again.run()
    assert full.scene.num_gaussians == again.scene.num_gaussians > 300
    for (name, a), (_, b) in zip(full.scene.named_parameters(), again.scene.named_parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(full.estimator.alpha, again.estimator.alpha)


def test_snapshot_is_a_cpu_copy_for_the_viewer(tiny_prior):
    tr = Trainer(gs_config(steps=3), prior=tiny_prior)
    tr.run()
    snap = tr.latest()
    assert snap.step == 3 and snap.previews.shape[0] == 4 and snap.previews.device.type == "cpu"
    g = snap.gaussians
    assert g["means"].shape[1] == 3 and g["covariances"].shape[1:] == (3, 3)
    assert isinstance(g["means"], np.ndarray)
    g["means"][:] = 1e6  # the UI may scribble on its copy; the live scene is untouched
    assert tr.scene.means.abs().max() < 1e3
    assert "saturation" in snap.history[-1] and "floater_score" in snap.history[-1]


def test_sigkill_mid_run_leaves_a_loadable_checkpoint(tiny_sd_dir, tmp_path):
    out = tmp_path / "killed"
    code = "import sys; from lods.__main__ import main; sys.exit(main(sys.argv[1:]))"
    args = [sys.executable, "-c", code, "generate", "--prompt", "a red cube", "--backbone", "gs",
            "--prior", str(tiny_sd_dir), "--steps", "100000", "--device", "cpu", "--set", "checkpoint_every=1",
            "--set", "gaussians.num_points=200", "--set", "batch=1", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120

    def checkpoint_step() -> int:
        try:
            return checkpoint.load(out / "checkpoint.safetensors")["step"]
        except UserError:
            return 0

    try:
        # Kill it once several checkpoints were written, very likely in the middle of the next write.
        while time.monotonic() < deadline and checkpoint_step() < 3:
            try:
                proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / "checkpoint.safetensors").exists()
    ck = checkpoint.load(out / "checkpoint.safetensors")
    assert ck["step"] >= 1
    code = main(["generate", "--prompt", "a red cube", "--resume", str(out), "--steps", str(ck["step"] + 2),
                 "--out", str(out)])
    assert code == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == ck["step"] + 2


def test_generate_nerf_exports_a_mesh(tiny_sd_dir, tmp_path):
    import trimesh

    out = tmp_path / "nerf"
    code = main(["generate", "--prompt", "a red cube", "--backbone", "nerf", "--prior", str(tiny_sd_dir),
                 "--steps", "3", "--device", "cpu", "--set", "nerf.samples_per_ray=24",
                 "--set", "nerf.grid={n_levels: 4, log2_hashmap_size: 12}", "--out", str(out)])
    assert code == 0
    for name in ("mesh.glb", "views.png", "turntable.mp4", "summary.json", "checkpoint.safetensors"):
        assert (out / name).exists(), name
    mesh = trimesh.load(out / "mesh.glb", force="mesh")
    assert len(mesh.faces) > 100 and mesh.visual.vertex_colors.shape[0] == len(mesh.vertices)
    radius = float(np.linalg.norm(mesh.vertices, axis=1).mean())
    assert 0.1 < radius < 1.0  # the starting density blob, not noise all over the bounding sphere


def test_nerf_resume_is_exact(tiny_prior, tmp_path):
    nerf = {"samples_per_ray": 24, "grid": {"n_levels": 4, "log2_hashmap_size": 12}}
    cfg = dict(backbone="nerf", batch=1, nerf=nerf, steps=4)
    full = Trainer(gs_config(**cfg), prior=tiny_prior)
    full.run()
    half = Trainer(gs_config(**{**cfg, "steps": 2}), prior=tiny_prior, out_dir=tmp_path)
    half.run()
    again = Trainer(gs_config(**cfg), prior=tiny_prior, out_dir=tmp_path)
    again.load_checkpoint(tmp_path / "checkpoint.safetensors")
    again.run()
    for (name, a), (_, b) in zip(full.scene.named_parameters(), again.scene.named_parameters()):
        assert torch.equal(a, b), name
