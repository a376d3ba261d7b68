"""The toy world's view-conditioned prior: a Zero-1-to-3 in miniature, trained on pairs of world renders.

Same classes and conventions as the real model (:mod:`lods.priors.views`): a ``UNet2DConditionModel`` with
8 input channels (the noisy target latent and the input view's latent from the text prior's VAE), a tiny
``CLIPVisionModelWithProjection`` trained jointly as the image encoder, a ``CCProjection`` of
[image embedding, relative camera] as the one-token cross-attention context, and 10% null conditioning
(zero context, zero concatenated latent) so that classifier-free guidance works.

Hold-out rule (fixed before training): the model trains only on scenes drawn with the world's own
:data:`~lods.priors.toy.world.HELD_OUT` colour-shape pairs excluded (the pairs the text prior never saw either),
from the training seed stream; its report is measured on scenes from a separate seed stream (new object
instances: placement, pattern, yaw) that each contain a held-out pair.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lods.cameras import Cameras, orbit, sample_cameras
from lods.priors.toy.train import WEIGHTS_DIR, sd_scheduler
from lods.priors.toy.world import CATEGORIES, Scene, random_scene, render_scenes
from lods.priors.views import CCProjection, ViewConditionedPrior, clip_pixels, relative_camera

VIEWS_DIR = WEIGHTS_DIR / "views"
VIEWS_PER_SCENE = 4
CHUNK = 64
EVAL_SEED = 7_000_000  # the report's scene stream; training scenes come from seed * 100_003 + index + 1
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class ViewTrainConfig:
    out: str = str(VIEWS_DIR)
    work: str = ".cache/toy-views"
    steps: int = 2500
    scenes: int = 2048
    batch: int = 24
    lr: float = 3e-4
    warmup: int = 200
    null_prob: float = 0.1
    ema_decay: float = 0.999
    checkpoint_every_s: float = 180.0
    seed: int = 0
    threads: int = 1


# ------------------------------------------------------------------------------------------ the world
def training_scene(index: int, seed: int = 0) -> Scene:
    """Scene ``index`` of the training stream: never one with a held-out colour-shape pair."""
    return random_scene(random.Random(seed * 100_003 + index + 1), allow_held_out=False)


def held_out_scene(index: int) -> Scene:
    """Scene ``index`` of the report's stream: categories in turn, each with a held-out colour-shape pair."""
    rng = random.Random(EVAL_SEED + index)
    while True:
        scene = random_scene(rng, CATEGORIES[index % len(CATEGORIES)], allow_held_out=True)
        if scene.held_out:
            return scene


def render_views(scene: Scene, cameras: Cameras, placement_seed: int) -> torch.Tensor:
    """(V, 3, H, W) renders of one scene instance (same placement, patterns, yaw) from each camera."""
    return torch.cat([render_scenes([scene], cameras[k:k + 1], random.Random(placement_seed)).rgb
                      for k in range(len(cameras))])


def render_pairs_cache(cfg: ViewTrainConfig) -> list[Path]:
    """Chunks of ``CHUNK`` training scenes x ``VIEWS_PER_SCENE`` random world cameras; resumable."""
    folder = Path(cfg.work) / "renders"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in range((cfg.scenes + CHUNK - 1) // CHUNK):
        path = folder / f"chunk_{c:04d}.pt"
        paths.append(path)
        if path.exists():
            continue
        rgb, el, az, dist, caps = [], [], [], [], []
        for i in range(c * CHUNK, (c + 1) * CHUNK):
            scene = training_scene(i, cfg.seed)
            assert not scene.held_out
            cams = sample_cameras(VIEWS_PER_SCENE, 64, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + i))
            rgb.append((render_views(scene, cams, cfg.seed * 100_003 + i) * 255).round().to(torch.uint8))
            el.append(cams.elevation)
            az.append(cams.azimuth)
            dist.append(cams.distance)
            caps.append(scene.caption)
        data = {"rgb": torch.stack(rgb), "elevation": torch.stack(el), "azimuth": torch.stack(az),
                "distance": torch.stack(dist), "captions": caps}
        tmp = path.with_suffix(".tmp")
        torch.save(data, tmp)
        tmp.replace(path)
        print(f"rendered chunk {c + 1}/{len(paths)}", flush=True)
    return paths


# ------------------------------------------------------------------------------------------ the model
def build_view_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=8, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128, attention_head_dim=16, norm_num_groups=16,
    )


def build_image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=64, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=128))


def build_feature_extractor():
    from lods.priors.views import clip_processor_class

    return clip_processor_class()(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                              image_mean=CLIP_MEAN, image_std=CLIP_STD)


def load_toy_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(WEIGHTS_DIR, subfolder="vae", torch_dtype=torch.float32,
                                         use_safetensors=True)


@torch.no_grad()
def encode_chunks(paths: list[Path], vae, work: Path) -> dict:
    """Every render's posterior mean (the unscaled latent Zero-1-to-3 concatenates), cached on disk."""
    path = work / f"latents_{len(paths)}.pt"
    if path.exists():
        return torch.load(path)
    parts = [torch.load(p) for p in paths]
    rgb = torch.cat([p["rgb"] for p in parts])
    n, v = rgb.shape[:2]
    flat = rgb.flatten(0, 1)
    mu = torch.cat([vae.encode(flat[i:i + 256].float() / 127.5 - 1).latent_dist.mean
                    for i in range(0, len(flat), 256)])
    out = {"rgb": rgb, "mu": mu.view(n, v, *mu.shape[1:]),
           **{k: torch.cat([p[k] for p in parts]) for k in ("elevation", "azimuth", "distance")},
           "captions": [c for p in parts for c in p["captions"]]}
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(path)
    return out


def view_loss(unet, image_encoder, cc, fe, data: dict, scene: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
              t: torch.Tensor, noise: torch.Tensor, null: torch.Tensor, scaling: float,
              alphas: torch.Tensor) -> torch.Tensor:
    """Epsilon loss of one batch of (input view ``src`` -> target view ``dst``) pairs of ``scene``."""
    z0 = data["mu"][scene, dst] * scaling
    concat = data["mu"][scene, src].clone()
    images = data["rgb"][scene, src].float() / 255
    emb = image_encoder(clip_pixels(images, fe)).image_embeds
    cam = relative_camera(*(data[k][scene, dst] for k in ("elevation", "azimuth", "distance")),
                          *(data[k][scene, src] for k in ("elevation", "azimuth", "distance")))
    ctx = cc(torch.cat([emb, cam], -1))[:, None]
    keep = (~null).float()
    ctx, concat = ctx * keep.view(-1, 1, 1), concat * keep.view(-1, 1, 1, 1)
    a = alphas[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    return F.mse_loss(unet(torch.cat([zt, concat], 1), t, encoder_hidden_states=ctx).sample, noise)


def train_views(cfg: ViewTrainConfig) -> Path:
    """Render pairs (resumable), encode them, train ``cfg.steps`` steps (resumable), export the EMA weights."""
    torch.set_num_threads(max(1, cfg.threads))
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    vae = load_toy_vae().requires_grad_(False).eval()
    data = encode_chunks(render_pairs_cache(cfg), vae, work)
    torch.manual_seed(cfg.seed)
    unet, enc, cc, fe = build_view_unet(), build_image_encoder(), CCProjection(128 + 4, 128), build_feature_extractor()
    models = {"unet": unet, "image_encoder": enc, "cc_projection": cc}
    emas = {k: copy.deepcopy(m).requires_grad_(False) for k, m in models.items()}
    params = [p for m in models.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ckpt = work / "views.pt"
    step, elapsed, history = 0, 0.0, []
    if ckpt.exists():
        ck = torch.load(ckpt)
        for k in models:
            models[k].load_state_dict(ck[k])
            emas[k].load_state_dict(ck["ema_" + k])
        opt.load_state_dict(ck["opt"])
        step, elapsed, history = ck["step"], ck["elapsed"], ck["history"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min)", flush=True)
    scaling = float(vae.config.scaling_factor)
    alphas = sd_scheduler().alphas_cumprod
    n = len(data["captions"])
    last_ck, window = time.time(), []

    def save() -> None:
        state = {k: m.state_dict() for k, m in models.items()}
        state.update({"ema_" + k: m.state_dict() for k, m in emas.items()})
        state.update(opt=opt.state_dict(), step=step, elapsed=elapsed, history=history)
        tmp = ckpt.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(ckpt)

    while step < cfg.steps:
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        for g in opt.param_groups:
            frac = min(1.0, step / max(1, cfg.steps))
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.55 + 0.45 * math.cos(math.pi * frac))
        scene = torch.randint(n, (cfg.batch,), generator=gen)
        src = torch.randint(VIEWS_PER_SCENE, (cfg.batch,), generator=gen)
        dst = (src + torch.randint(1, VIEWS_PER_SCENE, (cfg.batch,), generator=gen)) % VIEWS_PER_SCENE
        t = torch.randint(0, 1000, (cfg.batch,), generator=gen)
        noise = torch.randn(cfg.batch, 4, 16, 16, generator=gen)
        null = torch.rand(cfg.batch, generator=gen) < cfg.null_prob
        loss = view_loss(unet, enc, cc, fe, data, scene, src, dst, t, noise, null, scaling, alphas)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k in models:
                for pe, pl in zip(emas[k].parameters(), models[k].parameters()):
                    pe.lerp_(pl, 1 - decay)
        elapsed += time.time() - t0
        window.append(loss.item())
        if step % 50 == 0:
            history.append({"step": step, "loss": sum(window) / len(window), "minutes": elapsed / 60})
            print(f"step {step}: loss {history[-1]['loss']:.4f}, {elapsed / 60:.1f} min", flush=True)
            window = []
        if time.time() - last_ck > cfg.checkpoint_every_s or step >= cfg.steps:
            save()
            last_ck = time.time()
    out = export_views(emas["unet"], emas["image_encoder"], emas["cc_projection"], fe, vae, Path(cfg.out),
                       {"steps": step, "minutes": round(elapsed / 60, 1), "batch": cfg.batch, "scenes": n,
                        "final_loss": history[-1]["loss"] if history else None})
    print(f"trained {step} steps in {elapsed / 60:.1f} min; saved to {out}", flush=True)
    return out


def export_views(unet, image_encoder, cc, fe, vae, out: Path, training: dict) -> Path:
    """The Zero-1-to-3 diffusers layout in float16 safetensors (the VAE is the text prior's)."""
    from diffusers import DDIMScheduler

    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(unet).half().save_pretrained(out / "unet", safe_serialization=True)
    copy.deepcopy(image_encoder).half().save_pretrained(out / "image_encoder", safe_serialization=True)
    copy.deepcopy(cc).half().save_pretrained(out / "cc_projection", safe_serialization=True)
    copy.deepcopy(vae).half().save_pretrained(out / "vae", safe_serialization=True)
    fe.save_pretrained(out / "feature_extractor")
    DDIMScheduler.from_config(sd_scheduler().config, set_alpha_to_one=False).save_pretrained(out / "scheduler")
    index = {"_class_name": "Zero1to3StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "cc_projection": ["lods.priors.views", "CCProjection"],
             "feature_extractor": ["transformers", "CLIPImageProcessor"],
             "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
             "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    meta = {"_comment": "The toy world's view-conditioned prior (python -m lods toy-prior train-views).",
            "camera_mode": "zero123", "guidance_scale": 3.0, "training": training}
    (out / "lods_prior.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------------ the report
REPORT_AZIMUTHS = (90.0, 180.0, 270.0)  # target views relative to the input's azimuth


def report_views(folder: str | Path = VIEWS_DIR, n_scenes: int = 36, steps: int = 25, guidance_scale: float = 3.0,
                 out: str | Path | None = None) -> dict:
    """Novel views sampled for held-out scenes: judged right by the judge, and PSNR against the true views.

    Input: a random world camera; targets: the input azimuth + 90, 180, 270 degrees at elevation 20,
    distance 2.85. References on the same views: the judge on the true renders, and the PSNR of the input
    image itself taken as the guess (what a prior that ignored the camera would at best give).
    """
    from lods.export import image_grid
    from lods.priors.toy.judge import judge_images, shipped_judge

    prior = ViewConditionedPrior.from_pretrained(str(folder))
    judge = shipped_judge()
    rows: list[dict] = []
    pictures = []
    for i in range(n_scenes):
        scene = held_out_scene(i)
        cin = sample_cameras(1, 64, generator=torch.Generator().manual_seed(EVAL_SEED + i))
        k = len(REPORT_AZIMUTHS)
        az = torch.tensor([float(cin.azimuth[0]) + a for a in REPORT_AZIMUTHS])
        cams = orbit(az, torch.full((k,), 20.0), torch.full((k,), 2.85), torch.full((k,), 42.5), 64, 64)
        image = render_views(scene, cin, EVAL_SEED + i)
        truth = render_views(scene, cams, EVAL_SEED + i)
        prior.set_reference(image, float(cin.elevation[0]), float(cin.azimuth[0]), float(cin.distance[0]))
        views = prior.sample(cams.elevation, cams.azimuth, cams.distance, steps=steps,
                             guidance_scale=guidance_scale, seed=i)
        caps = [scene.caption] * k
        right = judge_images(judge, views, caps)["objects_right"]
        right_true = judge_images(judge, truth, caps)["objects_right"]
        for v in range(k):
            rows.append({"scene": i, "caption": scene.caption, "category": scene.category,
                         "delta_azimuth": REPORT_AZIMUTHS[v],
                         "psnr": psnr(views[v], truth[v]), "psnr_copy": psnr(image[0], truth[v]),
                         "judged_right": bool(right[v]), "judged_right_true": bool(right_true[v])})
        if i < 6:
            pictures += [image[0], *truth, image[0] * 0 + 1, *views]
    summary = summarise(rows)
    report = {"folder": str(folder), "n_scenes": n_scenes, "views_per_scene": len(REPORT_AZIMUTHS),
              "steps": steps, "guidance_scale": guidance_scale, "summary": summary, "rows": rows}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if pictures:
            from PIL import Image

            Image.fromarray(image_grid(torch.stack(pictures), cols=1 + len(REPORT_AZIMUTHS))).save(
                out / "views.png")
    return report


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a.float().clamp(0, 1), b.float().clamp(0, 1)).item()
    return float(-10 * torch.log10(torch.tensor(max(mse, 1e-10))))


def summarise(rows: list[dict]) -> dict:
    """Means overall and per category; the paired difference to the copy baseline (scenes as the unit: their
    views averaged first) with its 95% bootstrap interval."""
    from dataclasses import asdict as as_dict

    from lods.bench.stats import paired_test

    def block(rs: list[dict]) -> dict:
        scenes = sorted({r["scene"] for r in rs})
        per = [[r for r in rs if r["scene"] == s] for s in scenes]
        test = paired_test([_mean(r["psnr_copy"] for r in g) for g in per], [_mean(r["psnr"] for r in g) for g in per],
                           "greater")
        return {"n_views": len(rs), "n_scenes": len(scenes), "psnr": _mean(r["psnr"] for r in rs),
                "psnr_copy": _mean(r["psnr_copy"] for r in rs), "psnr_minus_copy": as_dict(test),
                "judged_right": _mean(r["judged_right"] for r in rs),
                "judged_right_true_views": _mean(r["judged_right_true"] for r in rs)}

    out = {"all": block(rows)}
    for cat in CATEGORIES:
        rs = [r for r in rows if r["category"] == cat]
        if rs:
            out[cat] = block(rs)
    return out


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs)


def remove_work(work: str | Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
