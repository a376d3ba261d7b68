"""``python -m lods bench gpu``: the CUDA paths checked against their CPU references, and the paper's settings
timed on Stable Diffusion 2.1-base's architecture, in one command, with no download.

Three parts, one report (``gpu.json`` and ``gpu.md``):

* checks: gsplat's rasterizer against the project's PyTorch rasterizer (values and gradients), nerfacc's
  occupancy-grid marcher and tinycudann's hash grid (where they import) against the dense PyTorch renderer
  and :class:`~lods.scenes.hashgrid.HashGrid`, and the LODS-embed step in fp16 against fp32 on a tiny
  Stable-Diffusion-format model. The CPU-side references are checked too: the sparse rasterizer against
  the dense one, and its projection against gsplat's own PyTorch projection (gsplat's reference for its
  kernel, which runs on CPU).
* timing: Stable Diffusion 2.1-base's UNet, VAE and text encoder built from their published configs
  (``sd21_configs/``, a few KB) with random weights, and one LODS-embed step of the project's trainer timed
  per phase at the official Gaussian-splat setting (8 views at 512 px, fp16) and at the NeRF setting
  (1 view at 256 px), with the peak GPU memory.
* FLOPs: the models' work in one LODS-embed step (the theta step's UNet forward on 2B latents, the VAE
  encode of the B renders with its backward, the Eq. 8 update's UNet forward and backward on B latents),
  counted with ``torch.utils.flop_counter`` on the ``meta`` device (no memory, no GPU), so that the time of
  the official run (2,500 steps; NeRF 25,000) comes with the share of the GPU's dense fp16 peak it reaches.
  One real step is counted too (``counted_step_flops`` in the JSON): on CUDA it adds only the small ops the
  counter sees around the models (gsplat's kernels are invisible to it); on the CPU the sparse rasterizer's
  CSR products count as dense ones, so there it overstates the render.

``--cpu-reference`` runs everything that runs without CUDA, the timing on tiny models of the same
architecture: it shows the report's format and checks the CPU references; it measures nothing about a GPU.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from lods.bench.raster import random_gaussians
from lods.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "sd21_configs"
COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")

# Dense fp16 tensor-core peaks (TFLOP/s, fp32 accumulate, no sparsity) from NVIDIA's data sheets, matched
# against torch.cuda.get_device_name in this order; None, or no match, is "unknown".
PEAK_FP16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", None),
    (r"\bH100\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bT4\b", 65.0),
    (r"\bRTX 4090\b", 165.0),
    (r"\bV100\b.*\bPCIE\b", 112.0),
    (r"\bV100\b", 125.0),
)

# The official release's settings (examples/configs/sd21-gs-lods-embed.yaml and sd21-nerf-lods-embed.yaml).
OFFICIAL: dict[str, dict[str, Any]] = {
    "gs": {
        "backbone": "gs", "method": "lods-embed", "cfg": 1000.0, "steps": 2500, "batch": 8, "resolution": 512,
        "learned_lr": 1.0e-4, "negative_prompt": "a point cloud image", "view_prompts": True,
        "guidance": {"schedule": {"min_frac": 0.02, "max_frac": 0.98, "anneal": "step", "anneal_to": 0.55,
                                  "anneal_step": 500}, "weighting": "sds"},
        "camera": {"distance": [2.5, 4.0], "fovy": [40.0, 70.0], "elevation": [-10.0, 45.0]},
    },
    "nerf": {
        "backbone": "nerf", "method": "lods-embed", "cfg": 1000.0, "steps": 25000, "batch": 1, "resolution": 256,
        "learned_lr": 1.0e-5, "view_prompts": True,
        "guidance": {"schedule": {"min_frac": 0.02, "max_frac": 0.98, "anneal": "step", "anneal_to": 0.5,
                                  "anneal_step": 10000}, "weighting": "sds"},
        "camera": {"distance": [2.5, 4.0], "fovy": [40.0, 70.0], "elevation": [-10.0, 45.0]},
    },
}
PROMPT = "a DSLR photo of a hamburger"


# ----------------------------------------------------------------------------- models


def sd21_configs() -> dict[str, dict[str, Any]]:
    """Stable Diffusion 2.1-base's published component configs, as shipped in ``sd21_configs/``."""
    return {name: json.loads((CONFIG_DIR / f"{name}.json").read_text()) for name in COMPONENTS}


def tiny_configs() -> dict[str, dict[str, Any]]:
    """The same architecture at toy size (8x8 latents, a 2x VAE): what ``--cpu-reference`` and the tests time."""
    full = sd21_configs()
    unet = {**full["unet"], "sample_size": 8, "block_out_channels": [8, 16], "layers_per_block": 1,
            "attention_head_dim": [2, 4], "cross_attention_dim": 16, "norm_num_groups": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    vae = {**full["vae"], "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
           "sample_size": 16, "down_block_types": ["DownEncoderBlock2D"] * 2,
           "up_block_types": ["UpDecoderBlock2D"] * 2}
    text = {**full["text_encoder"], "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "projection_dim": 16}
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": full["scheduler"]}


def _tokenizer(max_length: int, vocab_size: int):
    """A word-level tokenizer over the prompts' words, padded to ``max_length`` like CLIP's (ids < vocab_size).

    The models' weights are random, so which ids the words get does not matter; only the shapes do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in (PROMPT, OFFICIAL["gs"]["negative_prompt"], "front side back overhead view")
                    for w in re.findall(r"\w+", text.lower())})
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *words])}
    if len(vocab) > vocab_size:
        raise ValueError(f"the text encoder's vocabulary ({vocab_size}) is smaller than the prompts' words")
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                        special_tokens=[("<bos>", 1), ("<eos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)


def build_modules(configs: dict[str, dict[str, Any]], device: torch.device | str = "cpu", seed: int = 0):
    """UNet, VAE, text encoder (random weights, made directly on ``device``; ``meta`` allocates nothing) and the
    noise scheduler, from component configs such as :func:`sd21_configs`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def clean(cfg: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(clean(configs["unet"]))
        vae = AutoencoderKL.from_config(clean(configs["vae"]))
        text_cfg = clean(configs["text_encoder"])
        text_cfg.pop("model_type", None)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    scheduler = DDPMScheduler.from_config(clean(configs["scheduler"]))
    return unet, vae, text_encoder, scheduler


def build_prior(configs: dict[str, dict[str, Any]], device: torch.device | str, dtype: torch.dtype | None = None,
                seed: int = 0):
    """A :class:`~lods.priors.diffusers_prior.DiffusersPrior` of random weights with the configs' architecture."""
    from diffusers.utils import logging as diffusers_logging

    from lods.priors.diffusers_prior import DiffusersPrior

    unet, vae, text_encoder, scheduler = build_modules(configs, device, seed)
    cfg = text_encoder.config
    tokenizer = _tokenizer(cfg.max_position_embeddings, cfg.vocab_size)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its note on casting models that keep no module in fp32 is noise here
    try:
        return DiffusersPrior(unet, vae, text_encoder, tokenizer, scheduler, device=device, dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)


# ----------------------------------------------------------------------------- FLOPs


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything ``fn`` runs (forward and backward) that torch's FLOP counter knows."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def model_flops(configs: dict[str, dict[str, Any]], settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The models' FLOPs, counted on the ``meta`` device (no memory, no GPU): one batch-1 UNet forward at the
    native latent size, one VAE encode at the native image size, one text-encoder forward, and the model work
    of one LODS-embed step per setting (``step_model_flops``): the theta step's UNet forward on the 2B
    conditional and alpha latents, the VAE encode of the B renders (resized to the native image size) with its
    backward into the pixels, and the Eq. 8 update's UNet forward on B latents with its backward into alpha.
    Every op counted (convolutions, matrix products, attention) is linear in the batch, so each part is counted
    at batch 1 and multiplied."""
    key = json.dumps(configs, sort_keys=True)
    out = dict(_native_flops(key))
    factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    out["step_model_flops"] = {}
    native = int(configs["unet"]["sample_size"]) * factor  # renders are resized to it before the encoder
    for name, s in settings.items():
        b, size = int(s["batch"]), native
        out["step_model_flops"][name] = b * (2 * _part_flops(key, "unet", size // factor, False)
                                             + _part_flops(key, "vae", size, True)
                                             + _part_flops(key, "unet", size // factor, True))
    return out


@functools.cache
def _meta_modules(key: str):
    unet, vae, text_encoder, _ = build_modules(json.loads(key), "meta")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    return unet, vae, text_encoder


@functools.cache
def _part_flops(key: str, part: str, size: int, grad: bool) -> int:
    """FLOPs of one batch-1 UNet forward at ``size`` latents or VAE encode at ``size`` px (with its backward into
    the text embedding or the pixels when ``grad``), on the meta device."""
    unet, vae, text_encoder = _meta_modules(key)
    meta = torch.device("meta")

    def run() -> None:
        if part == "unet":
            tokens, width = text_encoder.config.max_position_embeddings, unet.config.cross_attention_dim
            z = torch.empty(1, unet.config.in_channels, size, size, device=meta)
            emb = torch.empty(1, tokens, width, device=meta, requires_grad=grad)
            out = unet(z, torch.zeros(1, dtype=torch.long, device=meta), encoder_hidden_states=emb).sample
        else:
            x = torch.empty(1, 3, size, size, device=meta, requires_grad=grad)
            out = vae.encode(x).latent_dist.mean
        if grad:
            out.sum().backward()

    return count_flops(run)


@functools.cache
def _native_flops(key: str) -> dict[str, Any]:
    unet, vae, text_encoder = _meta_modules(key)
    latent = int(unet.config.sample_size)
    image = latent * 2 ** (len(vae.config.block_out_channels) - 1)
    tokens = int(text_encoder.config.max_position_embeddings)
    return {
        "unet_forward_batch1": _part_flops(key, "unet", latent, False),
        "vae_encode_batch1": _part_flops(key, "vae", image, False),
        "text_encoder_forward": count_flops(
            lambda: text_encoder(torch.zeros(1, tokens, dtype=torch.long, device=torch.device("meta")))),
        "latent_size": latent,
        "image_size": image,
        "parameters": {name: sum(p.numel() for p in m.parameters())
                       for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))},
    }


def peak_fp16_tflops(device_name: str) -> float | None:
    """The dense fp16 peak of a GPU by its name (``PEAK_FP16_TFLOPS``); None when unknown."""
    for pattern, peak in PEAK_FP16_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return peak
    return None


# ----------------------------------------------------------------------------- checks


def _check(name: str, fn: Callable[[], dict[str, Any]], *, needs: str | None = None) -> dict[str, Any]:
    """Run one check; a check returns its metrics and ``ok``; ``needs`` (a reason) skips it."""
    record: dict[str, Any] = {"name": name}
    if needs:
        return {**record, "status": "skipped", "reason": needs}
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as err:  # a failing CUDA path is a finding to report, not a crash of the whole bench
        from lods.errors import one_line

        return {**record, "status": "fail", "reason": f"{type(err).__name__}: {one_line(err, 300)}",
                "seconds": time.perf_counter() - t0}
    ok = result.pop("ok")
    return {**record, "status": "pass" if ok else "fail", **result, "seconds": time.perf_counter() - t0}


def _cameras(width: int, height: int):
    from lods.cameras import orbit

    return orbit(torch.tensor([20.0, 140.0, -100.0]), torch.tensor([15.0, 35.0, 5.0]), torch.tensor([2.6, 3.0, 2.8]),
                 torch.tensor([40.0, 45.0, 42.0]), width, height)


def _render_and_grad(params: dict[str, torch.Tensor], cams, backend: str, sh_degree: int | None,
                     device: torch.device) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """rgb, alpha, depth (on the CPU) and the gradients of a fixed random weighting of them."""
    from lods.scenes.rasterize import rasterize_gaussians

    params = {k: v.detach().to(device).clone().requires_grad_() for k, v in params.items()}
    cams = cams.to(device)
    g = torch.Generator().manual_seed(1)
    shape = (len(cams), cams.height, cams.width)
    weights = [torch.randn(*shape, c, generator=g).to(device) for c in (3, 1, 1)]
    bg = torch.tensor([[1.0, 1.0, 1.0], [0.2, 0.5, 0.9], [0.0, 0.0, 0.0]], device=device)
    outs = rasterize_gaussians(**params, viewmats=cams.viewmat, Ks=cams.K, width=cams.width, height=cams.height,
                               background=bg, sh_degree=sh_degree, backend=backend)[:3]
    sum(((o * w).sum() for o, w in zip(outs, weights)), torch.zeros((), device=device)).backward()
    return [o.detach().cpu() for o in outs], {k: v.grad.cpu() for k, v in params.items()}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def check_projection_vs_gsplat_torch() -> dict[str, Any]:
    """The project's EWA projection against gsplat's PyTorch projection (its kernel's reference) on the CPU."""
    from gsplat.cuda._torch_impl import _fully_fused_projection

    from lods.scenes.rasterize import _project, quat_scale_to_covar

    p = random_gaussians(400, seed=3, sh_degree=None)
    cams = _cameras(48, 40)
    ours = _project(p["means"], p["quats"], p["scales"], p["opacities"], cams.viewmat, cams.K, cams.width,
                    cams.height, 0.01, 1e10, 0.3)
    covars = quat_scale_to_covar(p["quats"], p["scales"])
    radii, means2d, depths, conics, _ = _fully_fused_projection(p["means"], covars, cams.viewmat, cams.K,
                                                                cams.width, cams.height, eps2d=0.3)
    both = ours["valid"] & (radii > 0).all(-1)
    diffs = {
        "means2d_px": _max_diff(ours["means2d"][both], means2d[both]),
        "depths": _max_diff(ours["depths"][both], depths[both]),
        "conics_rel": float(((ours["conics"][both] - conics[both]).abs() / conics[both].abs().amax(-1, True)).max()),
    }
    tol = {"means2d_px": 1e-3, "depths": 1e-5, "conics_rel": 1e-4}
    return {"ok": bool(both.sum() > 100) and all(diffs[k] <= tol[k] for k in tol), "compared": int(both.sum()),
            "max_diff": diffs, "tolerance": tol}


def check_sparse_vs_dense() -> dict[str, Any]:
    """The CPU rasterizer (sparse) against the reference compositor (dense): values and gradients."""
    cams = _cameras(24, 20)
    params = random_gaussians(150, seed=4, sh_degree=2)
    cpu = torch.device("cpu")
    out_s, grad_s = _render_and_grad(params, cams, "sparse", 2, cpu)
    out_d, grad_d = _render_and_grad(params, cams, "dense", 2, cpu)
    values = max(_max_diff(a, b) for a, b in zip(out_s, out_d))
    grads = max(_max_diff(grad_s[k], grad_d[k]) / max(grad_d[k].abs().max().item(), 1e-12) for k in params)
    tol = {"values": 1e-4, "gradients_rel": 1e-3}
    return {"ok": values <= tol["values"] and grads <= tol["gradients_rel"],
            "max_diff": {"values": values, "gradients_rel": grads}, "tolerance": tol}


def check_gsplat(device: torch.device, timing: tuple[int, int, int] = (20000, 8, 512)) -> dict[str, Any]:
    """``gsplat.rasterization`` (through the project's backend) against the sparse CPU rasterizer."""
    cams = _cameras(48, 40)
    t0 = time.perf_counter()  # the first call loads gsplat's kernels (compiling them on a first use without wheels)
    _render_and_grad(random_gaussians(10, seed=5, sh_degree=None), cams, "gsplat", None, device)
    first_call_s = time.perf_counter() - t0
    worst = {"values": 0.0, "gradients_rel": 0.0}
    for sh_degree in (None, 2):
        params = random_gaussians(500, seed=6, sh_degree=sh_degree)
        out_c, grad_c = _render_and_grad(params, cams, "sparse", sh_degree, torch.device("cpu"))
        out_g, grad_g = _render_and_grad(params, cams, "gsplat", sh_degree, device)
        worst["values"] = max(worst["values"], *(_max_diff(a, b) for a, b in zip(out_g, out_c)))
        worst["gradients_rel"] = max(worst["gradients_rel"], *(
            _max_diff(grad_g[k], grad_c[k]) / max(grad_c[k].abs().max().item(), 1e-12) for k in params))
    tol = {"values": 2e-3, "gradients_rel": 2e-2}
    ok = all(worst[k] <= tol[k] for k in tol)
    return {"ok": ok, "max_diff": worst, "tolerance": tol, "first_call_s": first_call_s,
            **_time_rasterizers(device, *timing)}


def _time_rasterizers(device: torch.device, n: int = 20000, views: int = 8, size: int = 512) -> dict[str, Any]:
    """Forward + backward of ``n`` Gaussians into ``views`` views at ``size`` px: gsplat on ``device``."""
    from lods.cameras import sample_cameras
    from lods.scenes.rasterize import rasterize_gaussians

    params = {k: v.to(device).requires_grad_() for k, v in random_gaussians(n, seed=7, sh_degree=0).items()}
    cams = sample_cameras(views, size, generator=torch.Generator().manual_seed(0)).to(device)

    def once() -> None:
        rgb = rasterize_gaussians(**params, viewmats=cams.viewmat, Ks=cams.K, width=size, height=size,
                                  sh_degree=0, backend="gsplat")[0]
        rgb.sum().backward()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    once()
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        once()
    sync()
    return {"gsplat_ms": 1000 * (time.perf_counter() - t0) / 5, "timed": f"{n} Gaussians, {len(cams)} views, "
            f"{size} px, forward + backward"}


def check_nerfacc(device: torch.device) -> dict[str, Any]:
    """nerfacc's occupancy-grid marcher against the dense renderer, on the same field (and the CPU's)."""
    from lods.cameras import turntable
    from lods.scenes.hashgrid import HashGrid
    from lods.scenes.nerf import NerfConfig, NerfScene

    torch.manual_seed(0)
    config = NerfConfig(samples_per_ray=256)
    cams = turntable(2, 32)
    scene = NerfScene(config, device=device).eval()
    if scene.sampler != "nerfacc":
        raise RuntimeError(f"the CUDA scene did not pick nerfacc (backend {scene.backend})")
    with torch.no_grad():
        fast = scene.render(cams)
        scene.sampler = "dense"
        references = {"dense on " + device.type: scene.render(cams)}
        if isinstance(scene.field.encoding, HashGrid):  # same parameters on both devices: compare with the CPU
            cpu_scene = NerfScene(config).eval()
            cpu_scene.load_state_dict({k: v.cpu() for k, v in scene.state_dict().items()})
            references["dense on cpu"] = cpu_scene.render(cams)
    diffs = {}
    for name, ref in references.items():
        for what in ("alpha", "rgb", "depth"):
            a, b = getattr(fast, what).float().cpu(), getattr(ref, what).float().cpu()
            diffs[f"{what} vs {name}"] = float((a - b).abs().mean())
    tol = {"alpha": 1e-2, "rgb": 1e-2, "depth": 2e-2}
    ok = all(v <= tol[k.split()[0]] for k, v in diffs.items())
    return {"ok": ok, "mean_abs_diff": diffs, "tolerance_mean_abs": tol, "backend": scene.backend}


def check_hashgrid_devices(device: torch.device) -> dict[str, Any]:
    """The PyTorch hash grid gives the same features on the GPU as on the CPU (same table)."""
    from lods.scenes.hashgrid import HashGrid, HashGridConfig

    torch.manual_seed(0)
    grid = HashGrid(HashGridConfig(n_levels=4, log2_hashmap_size=12, base_resolution=4, per_level_scale=2.0))
    with torch.no_grad():
        grid.table.uniform_(-1, 1)
    x = torch.rand(4096, 3)
    cpu = grid(x)
    gpu = grid.to(device)(x.to(device)).cpu()
    diff = _max_diff(gpu, cpu)
    return {"ok": diff <= 1e-5, "max_diff": diff, "tolerance": 1e-5}


def _fit_encoding(encoding: torch.nn.Module, device: torch.device, steps: int = 300) -> tuple[float, float]:
    """Fit encoding + a small MLP to a smooth 3D function; the first and the last loss."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(encoding.n_output_dims, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 1)).to(device)
    opt = torch.optim.Adam([*encoding.parameters(), *head.parameters()], lr=1e-2, eps=1e-15)
    losses = []
    for _ in range(steps):
        x = torch.rand(2**14, 3, device=device)
        target = torch.sin(6 * x[:, :1]) * torch.cos(4 * x[:, 1:2]) + x[:, 2:] ** 2
        loss = (head(encoding(x).float()) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    tail = losses[-20:]
    return losses[0], sum(tail) / len(tail)


def check_tinycudann(device: torch.device, steps: int = 300) -> dict[str, Any]:
    """tinycudann's hash grid (what ``make_encoding`` gives on CUDA) against the PyTorch one. Their vertices
    differ, so the check is behavioural: same output width, finite values, and it fits a smooth function at
    least about as well (final loss at most twice the PyTorch grid's, and below a tenth of its first)."""
    from lods.scenes.hashgrid import HashGrid, HashGridConfig, _TcnnEncoding, make_encoding

    config = HashGridConfig()
    tcnn_enc = make_encoding(config, device)
    if not isinstance(tcnn_enc, _TcnnEncoding):
        raise RuntimeError(f"make_encoding gave {type(tcnn_enc).__name__} on {device}, not tinycudann's")
    x = torch.rand(10000, 3, device=device)
    out = tcnn_enc(x)
    shape_ok = tuple(out.shape) == (10000, config.n_output_dims) and out.dtype == torch.float32
    first_t, last_t = _fit_encoding(tcnn_enc, device, steps)
    first_p, last_p = _fit_encoding(HashGrid(config, device), device, steps)
    ok = shape_ok and bool(torch.isfinite(out).all()) and last_t <= 2 * last_p and last_t <= 0.1 * first_t
    return {"ok": ok, "fit_loss": {"tinycudann": [first_t, last_t], "torch": [first_p, last_p]},
            "criterion": "tinycudann's final loss <= 2x the PyTorch grid's and <= 0.1x its first"}


def check_guidance_precision(device: torch.device, dtype: torch.dtype, cfg: float = 1000.0) -> dict[str, Any]:
    """One LODS-embed theta step and Eq. 8 update on a tiny SD model in ``dtype`` against the same in fp32:
    the direction's cosine similarity and relative error, at the official CFG weight (which multiplies the
    difference of two predictions, where low precision shows first). Passes at cosine >= 0.99."""
    from lods.guidance import GuidanceConfig, LodsEmbed

    results = {}
    for dt in (torch.float32, dtype):
        prior = build_prior(tiny_configs(), device, dtype=dt, seed=0)
        text, null = prior.encode_text([PROMPT]), prior.encode_text([""])
        g = torch.Generator().manual_seed(2)
        z = (torch.randn(4, *prior.latent_shape, generator=g)).to(device)
        est = LodsEmbed(prior, GuidanceConfig(lr=1e-2))
        torch.manual_seed(3)
        out = est.step(z, text, null, cfg, step=0)
        torch.manual_seed(4)
        update = est.update(z, text, null)
        results[dt] = (out.grad.float().cpu(), update["update_loss"], (est.alpha.detach() - est.alpha_init).cpu())
    (g32, loss32, move32), (glow, losslow, movelow) = results[torch.float32], results[dtype]
    cos = float(torch.nn.functional.cosine_similarity(g32.flatten(), glow.flatten(), dim=0))
    rel = float((glow - g32).norm() / g32.norm().clamp_min(1e-12))
    alpha_cos = float(torch.nn.functional.cosine_similarity(move32.flatten(), movelow.flatten(), dim=0))
    finite = bool(torch.isfinite(glow).all()) and math.isfinite(losslow)
    return {"ok": finite and cos >= 0.99, "dtype": str(dtype).replace("torch.", ""), "cfg": cfg,
            "direction_cosine": cos, "direction_rel_error": rel, "alpha_step_cosine": alpha_cos,
            "update_loss": {"fp32": loss32, "low": losslow}, "criterion": "direction cosine >= 0.99"}


def run_checks(device: torch.device, deadline: float | None = None) -> list[dict[str, Any]]:
    """Every check this machine can run; the others are listed as skipped, with the reason (no CUDA, a library
    not installed, or past ``deadline``, a ``time.perf_counter()`` value)."""
    from lods.scenes.hashgrid import tinycudann_available
    from lods.scenes.nerf import nerfacc_cuda_available
    from lods.scenes.rasterize import _gsplat_installed

    cuda = device.type == "cuda"
    no_gsplat = None if _gsplat_installed() else "gsplat is not installed"
    loads: dict[str, float] = {}

    def nerfacc_loads() -> str | None:  # loads nerfacc's kernels (compiling them on a first use without wheels)
        t0 = time.perf_counter()
        ok = nerfacc_cuda_available()
        loads["nerfacc"] = time.perf_counter() - t0
        return None if ok else "nerfacc's CUDA kernels do not load"

    plan: list[tuple[str, Callable[[], dict[str, Any]], bool, Callable[[], str | None]]] = [
        ("projection vs gsplat's PyTorch projection (CPU)", check_projection_vs_gsplat_torch, False,
         lambda: no_gsplat),
        ("sparse vs dense rasterizer (CPU)", check_sparse_vs_dense, False, lambda: None),
        ("gsplat vs the CPU rasterizer", lambda: check_gsplat(device), True, lambda: no_gsplat),
        ("PyTorch hash grid, GPU vs CPU", lambda: check_hashgrid_devices(device), True, lambda: None),
        ("nerfacc occupancy grid vs dense renderer",
         lambda: {**check_nerfacc(device), "kernel_load_s": loads.get("nerfacc")}, True, nerfacc_loads),
        ("tinycudann hash grid vs PyTorch hash grid", lambda: check_tinycudann(device), True,
         lambda: None if tinycudann_available() else "tinycudann is not installed (see README)"),
        (f"LODS-embed step, fp16 vs fp32 (tiny SD, {device.type})",
         lambda: check_guidance_precision(device, torch.float16), False, lambda: None),
        # bf16 is reachable only through the Python API (DiffusersPrior.from_pretrained(dtype="bf16")): measured,
        # not gated, as a record of what it would give.
        (f"LODS-embed step, bf16 vs fp32 (tiny SD, {device.type})",
         lambda: check_guidance_precision(device, torch.bfloat16), False, lambda: None),
    ]
    checks = []
    for name, fn, needs_cuda, missing in plan:
        if needs_cuda and not cuda:
            reason = "needs CUDA"
        elif deadline is not None and time.perf_counter() > deadline:
            reason = "the time budget was spent (--budget)"
        else:
            reason = missing()
        record = _check(name, fn, needs=reason)
        if "bf16" in name and record["status"] in ("pass", "fail"):
            record["status"] = f"info ({'within' if record['status'] == 'pass' else 'outside'} the bound)"
        checks.append(record)
    return checks


# ----------------------------------------------------------------------------- timing


def time_setting(prior, setting: dict[str, Any], steps: int = 3, warmup: int = 2, name: str = "") -> dict[str, Any]:
    """Time ``steps`` training steps of the project's trainer at ``setting`` (after ``warmup``), per phase, with
    the peak memory; then count the FLOPs of one more step."""
    from lods.bench.speed import PeakMemory
    from lods.config import RunConfig
    from lods.trainer import Trainer

    device = prior.device
    cfg = {k: v for k, v in setting.items() if k != "steps"}
    config = RunConfig.from_dict({**cfg, "prompt": PROMPT, "prior": "sd21", "device": str(device), "seed": 0,
                                  "steps": warmup + steps + 1, "snapshot_every": 10**9, "checkpoint_every": 0,
                                  "second_thread": False})  # as on a GPU: phases in sequence, summing to the step
    trainer = Trainer(config, prior=prior)
    timer = trainer.timer
    timer.watch_unet(prior.unet_call)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        for _ in range(warmup):
            trainer.train_step()
        sync()
        with PeakMemory(device) as mem:
            timer.reset()
            timer.enabled = True
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            sync()
            total = time.perf_counter() - t0
            timer.enabled = False
        try:
            counted = count_flops(trainer.train_step)
        except Exception:  # a kernel the counter cannot pass through: the models' count (meta) still stands
            counted = None
        finite = all(bool(torch.isfinite(p).all()) for p in trainer.scene.parameters())
        scene_size = (trainer.scene.num_gaussians if hasattr(trainer.scene, "num_gaussians") else None)
        backend = str(getattr(trainer.scene, "backend", "") or "")
    finally:
        timer.enabled = False
        timer.close()
        trainer.close()
    ms = {k: 1000 * v / steps for k, v in timer.seconds.items()}
    step_ms = 1000 * total / steps
    phases = {
        "render": ms.get("render", 0.0),
        "encode": ms.get("encode", 0.0),
        "unet_theta": ms.get("unet_forward_in_guidance", 0.0),
        "guidance_other": ms.get("guidance", 0.0) - ms.get("unet_forward_in_guidance", 0.0),
        "backward": ms.get("backward", 0.0),
        "optimizer": ms.get("optimizer", 0.0),
        "update": ms.get("learned_update", 0.0),
        "densify": ms.get("densify", 0.0),
    }
    phases["other"] = max(0.0, step_ms - sum(phases.values()))
    return {
        "setting": name or setting["backbone"], "backbone": setting["backbone"], "batch": setting["batch"],
        "resolution": setting["resolution"], "latent": prior.image_size // prior.vae_scale_factor,
        "dtype": str(prior.dtype).replace("torch.", ""),
        "steps_timed": steps, "ms_per_step": step_ms, "phases_ms": phases, "peak_memory_mb": mem.peak_mb,
        "memory_kind": "max_memory_allocated" if device.type == "cuda" else "process RSS",
        "counted_step_flops": counted, "official_steps": setting["steps"],
        "projected_run_s": step_ms / 1000 * setting["steps"], "scene_finite": finite, "num_gaussians": scene_size,
        "scene_backend": backend,
    }


# ----------------------------------------------------------------------------- the report


def _versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("torch", "diffusers", "transformers", "gsplat", "nerfacc", "tinycudann"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def bench_device(device: str | torch.device | None, cpu_reference: bool) -> torch.device:
    """The device the bench runs on: the CPU for ``cpu_reference``, else a CUDA device (a one-line ``UserError``
    where there is none)."""
    if cpu_reference:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("bench gpu needs a CUDA GPU and this machine has none (torch sees no CUDA device); "
                        "`--cpu-reference` runs the part that needs none")
    try:
        dev = torch.device(device or "cuda")
    except RuntimeError as err:
        raise UserError(f"unknown device {device!r}; use cuda or cuda:N") from err
    if dev.type != "cuda":
        raise UserError(f"bench gpu runs on a CUDA device, not {dev}; `--cpu-reference` runs the part that needs none")
    return dev


def run_gpu_bench(out: str | Path, device: str | torch.device | None = None, cpu_reference: bool = False,
                  configs: dict[str, dict[str, Any]] | None = None, settings: dict[str, dict[str, Any]] | None = None,
                  steps: int = 3, warmup: int = 2, budget_s: float | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole bench; writes ``gpu.json`` and ``gpu.md`` into ``out`` and returns the report.

    Without ``cpu_reference`` it needs CUDA (a ``UserError`` otherwise). With it, it runs on the CPU and times
    ``configs`` (default :func:`tiny_configs`) at ``settings`` (default: the official ones scaled to them).
    Past ``budget_s`` seconds no new check or setting starts (they are reported as skipped)."""
    dev = bench_device(device, cpu_reference)
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                   else f"{platform.machine() or 'unknown'} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} "
                        "torch threads")
    peak = peak_fp16_tflops(device_name) if dev.type == "cuda" else None
    configs = configs or (tiny_configs() if cpu_reference else sd21_configs())
    if settings is None:
        settings = scaled_settings(configs) if cpu_reference else OFFICIAL
    report: dict[str, Any] = {
        "mode": "cpu-reference" if cpu_reference else "cuda",
        "device": str(dev), "device_name": device_name, "peak_fp16_tflops": peak,
        "versions": _versions(), "python": sys.version.split()[0],
        "models": "tiny (SD 2.1 architecture, toy size)" if cpu_reference else "SD 2.1-base architecture",
    }

    report["checks"], report["timing"] = [], []

    def write() -> None:  # after every stage, so that a run cut short still leaves what it measured
        report["seconds"] = time.perf_counter() - t_start
        (out / "gpu.json").write_text(json.dumps(report, indent=2))
        (out / "gpu.md").write_text(format_report(report))

    log("checks ...")
    deadline = t_start + budget_s if budget_s is not None else None
    report["checks"] = run_checks(dev, deadline)
    for c in report["checks"]:
        log(f"  {c['status']:7s} {c['name']}" + (f" ({c['reason']})" if c.get("reason") else ""))
    write()
    log(f"FLOPs of Stable Diffusion 2.1-base's models (meta device) ... ({time.perf_counter() - t_start:.0f} s)")
    report["sd21_flops"] = model_flops(sd21_configs(), OFFICIAL)
    write()

    same = configs == sd21_configs() and settings == OFFICIAL
    step_flops = (report["sd21_flops"] if same else model_flops(configs, settings))["step_model_flops"]
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    prior = None
    for name, setting in settings.items():
        if deadline is not None and time.perf_counter() > deadline:
            report["timing"].append({"setting": name, "skipped": "the time budget was spent (--budget)"})
            log(f"skipped the {name} setting: the time budget was spent")
            continue
        log(f"timing the {name} setting ({setting['batch']} x {setting['resolution']} px) ...")
        try:
            prior = prior or build_prior(configs, dev, dtype=dtype)
            row = time_setting(prior, setting, steps=steps, warmup=warmup, name=name)
        except Exception as err:  # out of memory, a kernel that fails: reported, and the next setting still runs
            from lods.errors import one_line

            report["timing"].append({"setting": name, "error": f"{type(err).__name__}: {one_line(err, 300)}"})
            log(f"  failed: {report['timing'][-1]['error']}")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            write()
            continue
        row["step_flops"] = step_flops[name]
        step_s = row["ms_per_step"] / 1000
        row["achieved_tflops"] = row["step_flops"] / step_s / 1e12
        row["share_of_peak"] = row["achieved_tflops"] / peak if peak else None
        row["peak_bound_s_per_step"] = row["step_flops"] / (peak * 1e12) if peak else None
        report["timing"].append(row)
        log(f"  {row['ms_per_step']:.1f} ms/step, {_fmt_flops(row['step_flops'])}FLOP/step "
            f"({time.perf_counter() - t_start:.0f} s)")
        write()
    del prior
    write()
    log(f"wrote {out / 'gpu.md'} and {out / 'gpu.json'} ({report['seconds']:.0f} s)")
    return report


def scaled_settings(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The official settings at the size of ``configs``' models: the same batch and methods, the render size
    scaled as the native image size is (512 px -> the models' own), floored at 16 px."""
    factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    native = int(configs["unet"]["sample_size"]) * factor
    out = {}
    for name, s in OFFICIAL.items():
        res = max(16, int(s["resolution"] * native / 512) // 8 * 8)
        out[name] = {**s, "resolution": res}
    return out


def _fmt_flops(f: float | None) -> str:
    if f is None:
        return "-"
    return f"{f / 1e12:.2f} T" if f >= 1e11 else f"{f / 1e9:.2f} G"


def _fmt_metric(c: dict[str, Any]) -> str:
    skip = {"name", "status", "reason", "seconds", "tolerance", "criterion", "tolerance_mean_abs"}
    parts = []
    for k, v in c.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{kk} {_num(vv)}" for kk, vv in v.items())
            parts.append(f"{k}: {v}")
        else:
            parts.append(f"{k} {_num(v)}")
    return "; ".join(parts)


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ", ".join(_num(x) for x in v) + "]"
    return str(v)


def format_report(report: dict[str, Any]) -> str:
    """The markdown report: checks, the models' FLOPs, and the timing table with its projection."""
    peak = report["peak_fp16_tflops"]
    lines = [
        f"# bench gpu ({report['mode']})",
        "",
        f"Device: {report['device_name']} ({report['device']}); dense fp16 peak: "
        f"{f'{peak:g} TFLOP/s' if peak else 'unknown'}. Models: {report['models']}, random weights. "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v) + ".",
        "",
        "## Checks",
        "",
        "| check | result | measured | bound |",
        "| --- | --- | --- | --- |",
    ]
    for c in report["checks"]:
        bound = c.get("tolerance", c.get("tolerance_mean_abs", c.get("criterion", "")))
        if isinstance(bound, dict):
            bound = ", ".join(f"{k} {_num(v)}" for k, v in bound.items())
        measured = c.get("reason", "") if c["status"] != "pass" and "reason" in c else _fmt_metric(c)
        lines.append(f"| {c['name']} | {c['status']} | {measured} | {_num(bound)} |")
    f = report.get("sd21_flops")
    if f is None:
        return "\n".join(lines + ["", f"(stopped after the checks; {report['seconds']:.0f} s)", ""])
    lines += [
        "",
        "## Stable Diffusion 2.1-base FLOPs (counted on the meta device)",
        "",
        f"UNet forward, batch 1 at {f['latent_size']}x{f['latent_size']} latents: "
        f"{_fmt_flops(f['unet_forward_batch1'])}FLOP; VAE encode at {f['image_size']} px: "
        f"{_fmt_flops(f['vae_encode_batch1'])}FLOP; text encoder: "
        f"{_fmt_flops(f['text_encoder_forward'])}FLOP. Parameters: "
        + ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in f["parameters"].items()) + ".",
        "Model work of one LODS-embed step (2B-latent UNet forward; VAE encode with backward; B-latent UNet "
        "forward and backward into alpha): "
        + "; ".join(f"{k} {_fmt_flops(v)}FLOP" for k, v in f["step_model_flops"].items()) + ".",
        "",
        "## One LODS-embed step, by phase (ms)",
        "",
        "| setting | views x px | dtype | ms/step | render | encode | UNet (theta) | update | backward | optimizer "
        "| other | peak MB | FLOP/step | TFLOP/s | share of peak | official steps | projected run |",
        "|" + " --- |" * 17,
    ]
    for r in report["timing"]:
        if "error" in r or "skipped" in r:
            what = f"failed: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"| {r['setting']} | {what} |" + " |" * 15)
            continue
        p = r["phases_ms"]
        other = p["guidance_other"] + p["densify"] + p["other"]
        share = f"{100 * r['share_of_peak']:.1f}%" if r["share_of_peak"] is not None else "unknown"
        lines.append(
            f"| {r['setting']} ({r.get('scene_backend') or '-'}) | {r['batch']} x {r['resolution']} "
            f"({r['latent']}² latents) | {r['dtype']} | "
            f"{r['ms_per_step']:.1f} | "
            f"{p['render']:.1f} | {p['encode']:.1f} | {p['unet_theta']:.1f} | {p['update']:.1f} | "
            f"{p['backward']:.1f} | {p['optimizer']:.1f} | {other:.1f} | {r['peak_memory_mb']:.0f} | "
            f"{_fmt_flops(r['step_flops'])} | {r['achieved_tflops']:.3g} | {share} | {r['official_steps']:,} | "
            f"{_duration(r['projected_run_s'])} |")
    lines += [
        "",
        "UNet (theta): the theta step's forward on the conditional and alpha latents; update: Eq. 8's forward and "
        "backward into alpha and its Adam step; backward: into the scene through the VAE encoder and the renderer. "
        "FLOP/step: the models' work in one step (the step model above, counted on the meta device for the models "
        "and setting timed); TFLOP/s: FLOP/step / the measured step time; share of peak: TFLOP/s / the GPU's dense "
        "fp16 peak. Projected run: ms/step x the official steps, without snapshots, checkpoints or export. The "
        "renders are resized to the prior's image size (512 px) before the encoder, as threestudio does.",
        "",
        f"Total: {report['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"
