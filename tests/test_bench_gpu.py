"""``bench gpu`` without a GPU: its refusal, its CPU references, its report, and the CUDA paths' calls into gsplat,
nerfacc and tinycudann checked against those libraries' documented signatures through stand-ins that compute
with the project's own references."""

from __future__ import annotations

import inspect
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from lods.bench import gpu
from lods.bench.raster import random_gaussians

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- the command


def test_refuses_without_cuda_in_one_line(tmp_path, monkeypatch, capsys):
    from lods.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gpu", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "CUDA" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_official_settings_are_the_example_configs():
    for name, file in (("gs", "sd21-gs-lods-embed.yaml"), ("nerf", "sd21-nerf-lods-embed.yaml")):
        config = yaml.safe_load((ROOT / "examples" / "configs" / file).read_text())
        assert config.pop("prior") == "sd21"
        assert config == gpu.OFFICIAL[name]


def test_peak_table_matches_names_and_says_unknown_otherwise():
    assert gpu.peak_fp16_tflops("NVIDIA H200") == 989
    assert gpu.peak_fp16_tflops("NVIDIA H100 80GB HBM3") == 989
    assert gpu.peak_fp16_tflops("NVIDIA H100 PCIe") == 756
    assert gpu.peak_fp16_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert gpu.peak_fp16_tflops("NVIDIA L4") == 121
    assert gpu.peak_fp16_tflops("NVIDIA L40S") == 362
    assert gpu.peak_fp16_tflops("Tesla T4") == 65
    assert gpu.peak_fp16_tflops("NVIDIA GeForce RTX 4090") == 165
    assert gpu.peak_fp16_tflops("Tesla V100-PCIE-32GB") == 112 and gpu.peak_fp16_tflops("Tesla V100-SXM2-16GB") == 125
    for unknown in ("NVIDIA L40", "NVIDIA H100 NVL", "NVIDIA GeForce RTX 4080", "AMD Instinct MI300X", "cpu"):
        assert gpu.peak_fp16_tflops(unknown) is None


# ----------------------------------------------------------------------------- models and FLOPs


def test_shipped_configs_build_stable_diffusion_21_on_the_meta_device():
    for name in gpu.COMPONENTS:
        assert (gpu.CONFIG_DIR / f"{name}.json").stat().st_size < 4096
    unet, vae, text_encoder, scheduler = gpu.build_modules(gpu.sd21_configs(), "meta")
    # SD 2.1-base's published parameter counts (UNet 865.9M, VAE 83.7M, OpenCLIP ViT-H text tower 340.4M)
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in text_encoder.parameters()) == 340_387_840
    assert vae.config.scaling_factor == 0.18215 and unet.config.cross_attention_dim == 1024
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"


def test_model_flops_count_each_part_of_a_step():
    configs = gpu.tiny_configs()
    settings = {"a": {"batch": 1, "resolution": 16}, "b": {"batch": 3, "resolution": 32}}
    f = gpu.model_flops(configs, settings)
    assert f["latent_size"] == 8 and f["image_size"] == 16
    assert f["unet_forward_batch1"] > 0 and f["vae_encode_batch1"] > 0 and f["text_encoder_forward"] > 0
    # one step at batch 1 and the native size: 2 UNet forwards, an encode with its backward, a UNet forward and
    # its backward (backward into the inputs only: between one and two forwards' worth)
    a = f["step_model_flops"]["a"]
    fwd, enc = f["unet_forward_batch1"], f["vae_encode_batch1"]
    assert 3 * fwd + 2 * enc < a < 4 * fwd + 3 * enc
    # batch 3 at twice the side: renders are resized to the native size before the encoder, so 3x the work
    assert f["step_model_flops"]["b"] == 3 * a
    # the parts are counted at batch 1 and multiplied: what a batch of 3 counts directly
    unet = gpu._meta_modules(json.dumps(configs, sort_keys=True))[0]

    def forward_3() -> None:
        z = torch.empty(3, 4, 16, 16, device="meta")
        emb = torch.empty(3, 77, 16, device="meta", requires_grad=True)
        unet(z, torch.zeros(3, dtype=torch.long, device="meta"), encoder_hidden_states=emb).sample.sum().backward()

    assert gpu.count_flops(forward_3) == 3 * gpu._part_flops(json.dumps(configs, sort_keys=True), "unet", 16, True)


def test_unet_flops_of_sd21_counted_on_meta():
    f = gpu.model_flops(gpu.sd21_configs(), {})
    assert f["latent_size"] == 64 and f["image_size"] == 512
    # about 0.8 TFLOP per batch-1 forward at 64x64 latents
    assert 0.75e12 < f["unet_forward_batch1"] < 0.85e12


# ----------------------------------------------------------------------------- checks that run on the CPU


def test_cpu_reference_checks_pass():
    assert gpu._check("p", gpu.check_projection_vs_gsplat_torch)["status"] == "pass"
    assert gpu._check("s", gpu.check_sparse_vs_dense)["status"] == "pass"


def test_fp16_lods_step_on_cpu_agrees_with_fp32():
    r = gpu.check_guidance_precision(torch.device("cpu"), torch.float16)
    assert r["ok"] and r["dtype"] == "float16" and r["cfg"] == 1000.0
    assert 0.99 <= r["direction_cosine"] <= 1.0 and 0 < r["direction_rel_error"] < 1
    assert math.isfinite(r["update_loss"]["low"])


def test_a_failing_check_is_reported_not_raised():
    def broken():
        raise RuntimeError("kernel\nfailed")

    r = gpu._check("x", broken)
    assert r["status"] == "fail" and r["reason"].startswith("RuntimeError: kernel")
    assert gpu._check("y", broken, needs="needs CUDA") == {"name": "y", "status": "skipped", "reason": "needs CUDA"}


def test_cpu_reference_report(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "run_checks", lambda *a: [gpu._check("sparse", gpu.check_sparse_vs_dense),
                                                      gpu._check("gsplat", None, needs="needs CUDA")])
    lines: list[str] = []
    report = gpu.run_gpu_bench(tmp_path, cpu_reference=True, steps=1, warmup=1, log=lines.append)
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["mode"] == "cpu-reference" and saved["peak_fp16_tflops"] is None
    assert [c["status"] for c in saved["checks"]] == ["pass", "skipped"]
    rows = {r["setting"]: r for r in report["timing"]}
    assert set(rows) == {"gs", "nerf"}
    expected = gpu.model_flops(gpu.tiny_configs(), gpu.scaled_settings(gpu.tiny_configs()))["step_model_flops"]
    for name, r in rows.items():
        assert r["batch"] == gpu.OFFICIAL[name]["batch"] and r["official_steps"] == gpu.OFFICIAL[name]["steps"]
        assert r["ms_per_step"] > 0 and r["peak_memory_mb"] > 0 and r["scene_finite"]
        assert sum(r["phases_ms"].values()) == pytest.approx(r["ms_per_step"], rel=1e-6)
        assert r["phases_ms"]["unet_theta"] > 0 and r["phases_ms"]["update"] > 0 and r["phases_ms"]["encode"] > 0
        assert r["step_flops"] == expected[name]
        assert r["achieved_tflops"] == pytest.approx(r["step_flops"] / (r["ms_per_step"] / 1000) / 1e12)
        assert r["projected_run_s"] == pytest.approx(r["ms_per_step"] / 1000 * r["official_steps"])
        assert r["share_of_peak"] is None
    assert rows["gs"]["scene_backend"] == "torch" and rows["nerf"]["scene_backend"] == "dense+torch"
    # NeRF renders are counted only through their small MLPs: the counted step is the models' work and a little
    assert expected["nerf"] <= rows["nerf"]["counted_step_flops"] < 1.5 * expected["nerf"]
    md = (tmp_path / "gpu.md").read_text()
    assert "# bench gpu (cpu-reference)" in md and "dense fp16 peak: unknown" in md
    assert "| sparse | pass |" in md and "| gsplat | skipped | needs CUDA |" in md
    assert md.count("| unknown | ") == 2 and "0.80 TFLOP" in md
    assert any("wrote" in line for line in lines)


def test_a_setting_that_fails_is_reported_and_the_next_still_runs(tmp_path, monkeypatch, capsys):
    from lods.__main__ import main

    def time_setting(prior, setting, steps, warmup, name):
        if name == "gs":
            raise RuntimeError("CUDA out of memory")
        return {"setting": name, "backbone": "nerf", "batch": 1, "resolution": 16, "latent": 8, "dtype": "float32",
                "steps_timed": 1, "ms_per_step": 10.0, "phases_ms": dict.fromkeys(("render", "encode", "unet_theta",
                "guidance_other", "backward", "optimizer", "update", "densify", "other"), 1.0), "peak_memory_mb": 1.0,
                "counted_step_flops": 1, "official_steps": 25000, "projected_run_s": 250.0, "scene_finite": True,
                "num_gaussians": None}

    monkeypatch.setattr(gpu, "run_checks", lambda *a: [])
    monkeypatch.setattr(gpu, "time_setting", time_setting)
    assert main(["bench", "gpu", "--cpu-reference", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["timing"][0] == {"setting": "gs", "error": "RuntimeError: CUDA out of memory"}
    assert report["timing"][1]["setting"] == "nerf" and report["timing"][1]["step_flops"] > 0
    md = (tmp_path / "gpu.md").read_text()
    assert "| gs | failed: RuntimeError: CUDA out of memory |" in md and "| nerf (-) | 1 x 16 (8² latents) |" in md


def test_past_the_budget_nothing_new_starts(tmp_path, monkeypatch):
    # the meta-device counts are tested above; here only what the budget stops matters
    counts = {"unet_forward_batch1": 1, "vae_encode_batch1": 1, "text_encoder_forward": 1, "latent_size": 64,
              "image_size": 512, "parameters": {"unet": 1}}
    monkeypatch.setattr(gpu, "model_flops", lambda configs, settings: {**counts, "step_model_flops": {}})
    monkeypatch.setattr(gpu, "build_prior", None)  # nothing is timed: no model is built
    report = gpu.run_gpu_bench(tmp_path, cpu_reference=True, budget_s=0.0, log=lambda line: None)
    assert report["checks"] and all(c["status"] == "skipped" for c in report["checks"])
    assert {c["reason"] for c in report["checks"]} == {"needs CUDA", "the time budget was spent (--budget)"}
    assert report["timing"] == [{"setting": s, "skipped": "the time budget was spent (--budget)"}
                                for s in ("gs", "nerf")]
    assert "| gs | skipped: the time budget was spent (--budget) |" in (tmp_path / "gpu.md").read_text()


# ----------------------------------------------------------------------------- stand-ins of the CUDA libraries


def _gsplat_stand_in(calls: list[dict]):
    """``gsplat.rasterization`` as documented (arguments bound to the installed gsplat's own signature, shapes
    and dtypes as its docstring gives them), computing with the project's sparse rasterizer."""
    real = pytest.importorskip("gsplat").rasterization
    signature = inspect.signature(real)
    from lods.scenes.rasterize import rasterize_gaussians

    def rasterization(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        N, C = a["means"].shape[0], a["viewmats"].shape[0]
        shapes = {"means": (N, 3), "quats": (N, 4), "scales": (N, 3), "opacities": (N,), "viewmats": (C, 4, 4),
                  "Ks": (C, 3, 3)}
        for name, shape in shapes.items():
            assert tuple(a[name].shape) == shape, name
        colors = a["colors"]
        if a["sh_degree"] is not None:
            assert colors.dim() == 3 and colors.shape[0] == N and colors.shape[2] == 3
            assert colors.shape[1] >= (a["sh_degree"] + 1) ** 2
        else:
            assert colors.shape[-2] == N and colors.dim() in (2, 3)
        tensors = [a[k] for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")]
        assert all(t.dtype == torch.float32 and t.device == a["means"].device for t in tensors)
        assert a["render_mode"] in ("RGB", "D", "ED", "RGB+D", "RGB+ED")
        assert a["rasterize_mode"] in ("classic", "antialiased") and a["camera_model"] == "pinhole"
        calls.append({k: (tuple(v.shape), v.dtype) if torch.is_tensor(v) else v for k, v in a.items()})
        rgb, alpha, depth, meta = rasterize_gaussians(
            a["means"], a["quats"], a["scales"], a["opacities"], colors, a["viewmats"], a["Ks"], a["width"],
            a["height"], near=a["near_plane"], far=a["far_plane"], sh_degree=a["sh_degree"], eps2d=a["eps2d"],
            backend="sparse")
        assert a["render_mode"] == "RGB+D" and a["backgrounds"] is None
        info = {"radii": meta["radii"][..., None].expand(C, N, 2).int(), "means2d": meta["means2d"],
                "depths": meta["depths"], "flatten_ids": torch.zeros(meta["num_pairs"], dtype=torch.int32),
                "width": a["width"], "height": a["height"], "n_cameras": C}
        return torch.cat([rgb, depth], -1), alpha, info

    return types.SimpleNamespace(rasterization=rasterization, __version__="stand-in")


@pytest.fixture
def gsplat_on_cpu(monkeypatch):
    from lods.scenes import rasterize

    calls: list[dict] = []
    module = _gsplat_stand_in(calls)
    monkeypatch.setitem(sys.modules, "gsplat", module)
    monkeypatch.setattr(rasterize, "GSPLAT_DEVICES", ("cuda", "cpu"))
    return calls


@pytest.mark.parametrize("sh_degree", [None, 2])
def test_gsplat_backend_passes_the_documented_arguments_and_unpacks_the_results(gsplat_on_cpu, sh_degree):
    cams = gpu._cameras(24, 20)
    params = random_gaussians(120, seed=2, sh_degree=sh_degree)
    out_g, grad_g = gpu._render_and_grad(params, cams, "gsplat", sh_degree, torch.device("cpu"))
    out_s, grad_s = gpu._render_and_grad(params, cams, "sparse", sh_degree, torch.device("cpu"))
    (call,) = gsplat_on_cpu
    assert call["means"] == ((120, 3), torch.float32) and call["viewmats"] == ((3, 4, 4), torch.float32)
    assert call["colors"][0] == ((120, 3) if sh_degree is None else (120, 9, 3))
    assert call["packed"] is False and call["sh_degree"] == sh_degree and call["width"] == 24
    for g, s in zip(out_g, out_s):  # depth split off the last channel, background composited after
        torch.testing.assert_close(g, s)
    for name in params:
        torch.testing.assert_close(grad_g[name], grad_s[name])


def test_gaussian_scene_densifies_from_gsplats_meta(gsplat_on_cpu, monkeypatch):
    from lods.scenes import rasterize
    from lods.scenes.gaussians import GaussianConfig, GaussianScene

    scene = GaussianScene(GaussianConfig(num_points=200, sh_degree=1), generator=torch.Generator().manual_seed(0))
    reference = GaussianScene(GaussianConfig(num_points=200, sh_degree=1), generator=torch.Generator().manual_seed(0))
    cams = gpu._cameras(32, 32)
    ref = reference.render(cams)
    assert ref.extras["backend"] == "sparse"
    monkeypatch.setattr(rasterize, "default_backend", lambda device: "gsplat")
    out = scene.render(cams)
    assert out.extras["backend"] == "gsplat" and out.extras["radii"].dtype == torch.int64
    assert out.extras["radii"].shape == (3, 200)
    torch.testing.assert_close(out.rgb, ref.rgb)
    for o in (out, ref):
        o.rgb.mean().backward()
    scene._accumulate(out.extras)
    reference._accumulate(ref.extras)
    assert scene.grad2d_count.sum() > 0
    torch.testing.assert_close(scene.grad2d_sum, reference.grad2d_sum)
    torch.testing.assert_close(scene.max_radius, reference.max_radius)


def _tinycudann_stand_in(made: list):
    """tinycudann's ``Encoding(n_input_dims, encoding_config, seed=1337, dtype=None)`` (its torch bindings): input
    float (N, n_input_dims), output (N, n_output_dims) in ``dtype`` (fp32 or fp16; None: its preferred fp16),
    computed by the project's hash grid."""
    from lods.scenes.hashgrid import HashGrid, HashGridConfig

    class Encoding(torch.nn.Module):
        def __init__(self, n_input_dims, encoding_config, seed=1337, dtype=None):
            super().__init__()
            assert dtype in (None, torch.float32, torch.float16)
            keys = {"otype", "n_levels", "n_features_per_level", "log2_hashmap_size", "base_resolution",
                    "per_level_scale", "interpolation"}
            assert encoding_config["otype"] == "HashGrid" and set(encoding_config) <= keys
            made.append((n_input_dims, dict(encoding_config), dtype))
            cfg = {k: v for k, v in encoding_config.items() if k not in ("otype", "interpolation")}
            self.grid = HashGrid(HashGridConfig(**cfg))
            self.n_output_dims = self.grid.n_output_dims
            self.dtype = dtype or torch.float16

        def forward(self, x):
            assert x.dim() == 2 and x.shape[1] == n_input_dims_of(self) and x.min() >= 0 and x.max() <= 1
            return self.grid(x.float()).to(self.dtype)

    def n_input_dims_of(enc) -> int:
        return 3

    return types.SimpleNamespace(Encoding=Encoding)


def test_tinycudann_encoding_is_built_as_documented(monkeypatch):
    from lods.scenes.hashgrid import HashGridConfig, _TcnnEncoding
    from lods.scenes.nerf import NerfConfig, NerfField

    made: list = []
    monkeypatch.setitem(sys.modules, "tinycudann", _tinycudann_stand_in(made))
    config = HashGridConfig(n_levels=4, log2_hashmap_size=12)
    enc = _TcnnEncoding(config)
    assert made == [(3, config.tcnn_config(), torch.float32)]
    out = enc(torch.rand(50, 3) * 1.4 - 0.2)  # clamped into the unit cube before it reaches tinycudann
    assert out.shape == (50, config.n_output_dims) and out.dtype == torch.float32
    assert enc(torch.zeros(0, 3)).shape == (0, config.n_output_dims)
    field = NerfField(NerfConfig(grid=config))
    field.encoding = enc
    sigma, rgb = field(torch.rand(10, 3) - 0.5)
    assert sigma.shape == (10,) and rgb.shape == (10, 3)


def test_the_cuda_checks_run_through_the_stand_ins(gsplat_on_cpu, monkeypatch):
    """The bench's gsplat and tinycudann checks, run on the CPU with the stand-ins above: with a stand-in that
    computes as the reference does, they pass with nothing to tell the two apart."""
    from lods.scenes import hashgrid

    cpu = torch.device("cpu")
    r = gpu.check_gsplat(cpu, timing=(200, 2, 32))
    assert r["ok"] and r["max_diff"] == {"values": 0.0, "gradients_rel": 0.0} and r["gsplat_ms"] > 0
    assert len(gsplat_on_cpu) == 1 + 2 * 1 + 6  # first call, two SH settings, timing (1 + 5 calls)
    monkeypatch.setitem(sys.modules, "tinycudann", _tinycudann_stand_in([]))
    monkeypatch.setattr(hashgrid, "make_encoding", lambda config, device: hashgrid._TcnnEncoding(config))
    r = gpu.check_tinycudann(cpu, steps=3)
    # the same grid under both names (tables drawn apart): the same fit, up to the tables' 1e-4 initial noise
    assert r["fit_loss"]["tinycudann"] == pytest.approx(r["fit_loss"]["torch"], rel=0.05)
    assert gpu.check_hashgrid_devices(cpu) == {"ok": True, "max_diff": 0.0, "tolerance": 1e-5}


def test_nerfacc_sampling_is_called_as_documented():
    """The packed renderer's call of ``OccGridEstimator.sampling`` binds to nerfacc's signature, and its
    ``sigma_fn(t_starts, t_ends, ray_indices)`` gives one density per packed sample."""
    nerfacc = pytest.importorskip("nerfacc")
    from lods.scenes.nerf import NerfConfig, NerfScene

    signature = inspect.signature(nerfacc.OccGridEstimator.sampling)
    scene = NerfScene(NerfConfig(samples_per_ray=16))
    seen = {}

    class Stop(Exception):
        pass

    class Estimator(torch.nn.Module):
        def sampling(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            a = bound.arguments
            n = a["rays_o"].shape[0]
            assert a["rays_d"].shape == (n, 3) and a["t_min"].shape == (n,) and a["t_max"].shape == (n,)
            ray_indices = torch.arange(n).repeat_interleave(4)
            t_starts = a["t_min"][ray_indices] + 0.1 * torch.arange(4).repeat(n)
            sigmas = a["sigma_fn"](t_starts, t_starts + 0.1, ray_indices)
            seen.update(sigmas=sigmas.shape, n=n, kwargs=set(kwargs), step=a["render_step_size"])
            raise Stop

    scene.estimator = Estimator()
    scene.sampler = "nerfacc"
    origins = torch.tensor([[0.0, 0.0, 3.0], [0.2, 0.0, 3.0]])
    dirs = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    with pytest.raises(Stop):
        scene.render_rays(origins, dirs)
    assert seen["sigmas"] == (4 * seen["n"],) and seen["step"] == scene.config.step_size
    assert {"sigma_fn", "t_min", "t_max", "render_step_size", "early_stop_eps", "stratified"} <= seen["kwargs"]
