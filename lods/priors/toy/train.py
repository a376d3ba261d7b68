"""Training of the embedded prior: an AutoencoderKL, then a text-conditioned latent UNet.

Stage 1 trains a small ``AutoencoderKL`` on world renders (64x64 RGB -> 16x16x4 latents).
Stage 2 encodes the cache once, then trains a ``UNet2DConditionModel`` together with a small
``CLIPTextModel`` with Stable Diffusion's noise schedule (scaled-linear betas 0.00085-0.012,
1000 steps, epsilon prediction) and 10% caption dropout so that classifier-free guidance works.
Both stages checkpoint atomically and resume. The result is saved as a Stable-Diffusion-format
pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``), in float16 safetensors, that loads offline with ``from_pretrained``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm import tqdm

from lods.priors.toy.data import load_cache
from lods.priors.toy.text import MAX_LENGTH, build_text_encoder, build_tokenizer
from lods.priors.toy.world import parse_caption

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass
class ToyTrainConfig:
    cache: str = ".cache/toy-world"
    work: str = ".cache/toy-train"
    out: str = str(WEIGHTS_DIR)
    vae_minutes: float = 12.0
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_object_weight: float = 8.0
    decoder_minutes: float = 0.0
    decoder_batch: int = 32
    decoder_lr: float = 3e-4
    decoder_multi_fraction: float = 0.5
    unet_minutes: float = 90.0
    unet_batch: int = 32
    unet_lr: float = 4e-4
    unet_multi_fraction: float = 0.0  # share of two-object scenes per batch; 0: as they come in the cache
    unet_object_weight: float = 0.0  # extra loss weight on latent pixels covered by an object; 0: plain loss
    unet_cycle_from: float = 0.0  # minutes of UNet training at which a new warm-up + cosine cycle starts; 0: one cycle
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    checkpoint_every_s: float = 120.0
    seed: int = 0
    threads: int = 0  # 0: torch's default


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
        mid_block_add_attention=False,
    )


def build_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    """Attention only at 8x8 and 4x4; about 25 ms per batch-1 forward on a 2-core CPU."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=32,
        norm_num_groups=32,
    )


def sd_scheduler() -> DDPMScheduler:
    """Stable Diffusion's training schedule."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _resume(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    """Load a stage's ``{"model", "opt", "elapsed"}`` checkpoint if there is one; the seconds already spent."""
    if not path.exists():
        return 0.0
    ck = torch.load(path)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    return ck["elapsed"]


def _two_object(captions: list[str]) -> torch.Tensor:
    """Bool mask of the two-object captions."""
    return torch.tensor([parse_caption(c).category == "multi" for c in captions], dtype=torch.bool)


def _draw_batch(pool: torch.Tensor, multi: torch.Tensor, batch: int, multi_fraction: float,
                gen: torch.Generator) -> torch.Tensor:
    """``batch`` random indices of ``pool``, ``multi_fraction`` of them drawn from ``multi`` (two-object scenes)."""
    if not len(multi) or multi_fraction <= 0:
        return pool[torch.randint(len(pool), (batch,), generator=gen)]
    n_multi = round(batch * multi_fraction)
    return torch.cat([multi[torch.randint(len(multi), (n_multi,), generator=gen)],
                      pool[torch.randint(len(pool), (batch - n_multi,), generator=gen)]])


def latent_object_masks(rgb_u8: torch.Tensor, factor: int, chunk: int = 4096) -> torch.Tensor:
    """(N, 1, H/factor, W/factor) bool: latent pixels whose image patch holds anything but white background."""
    out = []
    for i in range(0, len(rgb_u8), chunk):
        fg = _not_white(_images(rgb_u8[i : i + chunk]), 0.2).float()  # 0.2 in [-1, 1]: 10% of the range
        out.append(F.max_pool2d(fg, factor) > 0)
    return torch.cat(out)


def _images(rgb_u8: torch.Tensor) -> torch.Tensor:
    return rgb_u8.float() / 127.5 - 1.0


def _not_white(x: torch.Tensor, tol: float) -> torch.Tensor:
    """(N, 1, H, W) bool: pixels of images in [-1, 1] farther than ``tol`` from white in some channel."""
    return (x - 1).abs().amax(1, keepdim=True) > tol


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, object_weight: float) -> torch.Tensor:
    """L1 + L2 with object pixels weighted up, plus an L2 on 4x4-pooled images.

    On white-background renders most pixels are background; without the weighting a small autoencoder
    keeps shape and brightness but drops hue, which is exactly what the prior must be able to show.
    """
    weight = 1 + object_weight * _not_white(x, 0.1).float()
    err = (rec - x).abs() + (rec - x).square()
    low = F.mse_loss(F.avg_pool2d(rec, 4), F.avg_pool2d(x, 4))
    return (weight * err).mean() / weight.mean() + object_weight * low


def train_vae(cfg: ToyTrainConfig, data: dict) -> AutoencoderKL:
    """Stage 1: reconstruction (L1 + L2) with a tiny KL term; resumes from ``work/vae.pt``."""
    work = Path(cfg.work)
    ckpt_path = work / "vae.pt"
    torch.manual_seed(cfg.seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    elapsed = _resume(ckpt_path, vae, opt)
    budget = cfg.vae_minutes * 60
    rgb = data["rgb"]
    n_test = 256
    train_rgb, test_rgb = rgb[n_test:], rgb[:n_test]
    gen = torch.Generator().manual_seed(cfg.seed + int(elapsed))
    bar = tqdm(total=int(budget), initial=int(min(elapsed, budget)), desc="vae", unit="s")
    last_ck = time.time()
    while elapsed < budget:
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * max(0.1, 1 - elapsed / budget)
        x = _images(train_rgb[torch.randint(len(train_rgb), (cfg.vae_batch,), generator=gen)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample  # deterministic: sampled latents drown the hue in noise
        loss = reconstruction_loss(rec, x, cfg.vae_object_weight) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.time() - t0
        elapsed += dt
        bar.update(int(elapsed) - bar.n)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if time.time() - last_ck > cfg.checkpoint_every_s or elapsed >= budget:
            _save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "elapsed": elapsed}, ckpt_path)
            last_ck = time.time()
    bar.close()
    vae.eval()
    with torch.no_grad():
        x = _images(test_rgb)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
    psnr = -10 * torch.log10(torch.tensor(mse)).item()
    (work / "vae_report.json").write_text(json.dumps({"psnr_db": psnr, "minutes": elapsed / 60}))
    print(f"vae: reconstruction PSNR on held-out renders {psnr:.2f} dB after {elapsed / 60:.1f} min")
    return vae


@torch.no_grad()
def encode_cache(vae: AutoencoderKL, data: dict, path: Path) -> dict:
    """Posterior mean and std of every render (computed once, cached to disk)."""
    if path.exists():
        return torch.load(path)
    means, stds = [], []
    for i in tqdm(range(0, len(data["rgb"]), 256), desc="encoding cache"):
        post = vae.encode(_images(data["rgb"][i : i + 256])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = float(1.0 / mean.flatten().std())
    out = {"mean": mean, "std": std, "scaling_factor": scaling}
    _save_atomic(out, path)
    return out


def finetune_decoder(cfg: ToyTrainConfig, vae: AutoencoderKL, data: dict, latents: dict) -> AutoencoderKL:
    """Stage 1b: train the decoder alone on the frozen encoder's cached latents; resumes from ``work/decoder.pt``.

    The encoder, hence the latent space the UNet learns, does not change, so this stage can run before or
    after the UNet. Two-object scenes (small objects, the hard case) make up ``decoder_multi_fraction`` of
    each batch, and the latents get a little noise so that the decoder tolerates the UNet's imprecision.
    """
    if cfg.decoder_minutes <= 0:
        return vae
    work = Path(cfg.work)
    ckpt_path = work / "decoder.pt"
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    elapsed = _resume(ckpt_path, vae, opt)
    budget = cfg.decoder_minutes * 60
    n_test = 256  # the VAE's held-out renders stay held out
    idx_all = torch.arange(n_test, len(data["captions"]))
    idx_multi = idx_all[_two_object(data["captions"][n_test:])]
    gen = torch.Generator().manual_seed(cfg.seed + 7 + int(elapsed))
    bar = tqdm(total=int(budget), initial=int(min(elapsed, budget)), desc="decoder", unit="s")
    last_ck = time.time()
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    while elapsed < budget:
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = cfg.decoder_lr * max(0.1, 1 - elapsed / budget)
        idx = _draw_batch(idx_all, idx_multi, cfg.decoder_batch, cfg.decoder_multi_fraction, gen)
        z = latents["mean"][idx]
        z = z + 0.05 * z.std() * torch.randn(z.shape, generator=gen)
        x = _images(data["rgb"][idx])
        rec = vae.decode(z).sample
        loss = reconstruction_loss(rec, x, cfg.vae_object_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        elapsed += time.time() - t0
        bar.update(int(elapsed) - bar.n)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if time.time() - last_ck > cfg.checkpoint_every_s or elapsed >= budget:
            _save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "elapsed": elapsed}, ckpt_path)
            last_ck = time.time()
    bar.close()
    vae.requires_grad_(True)
    vae.eval()
    print(f"decoder: fine-tuned for {elapsed / 60:.1f} min")
    return vae


def unet_lr_at(cfg: ToyTrainConfig, step: int, elapsed: float) -> float:
    """The UNet's learning rate: a warm-up, then a cosine from ``unet_lr`` down to a tenth of it at the budget.

    With ``unet_cycle_from`` > 0 the first cycle ends at that many minutes and a second one starts there
    (a fresh warm-up of 5 minutes, a new cosine over the rest of the budget): this continues a finished
    run. It is a function of the step and elapsed time alone, so an interrupted run resumes on the same curve.
    """
    budget, start = cfg.unet_minutes * 60, cfg.unet_cycle_from * 60
    if start > 0 and elapsed >= start:
        warm, frac = min(1.0, (elapsed - start) / 300), (elapsed - start) / max(budget - start, 1e-9)
    else:
        warm, frac = min(1.0, step / 500), elapsed / (start or budget)
    return cfg.unet_lr * warm * (0.5 * (1 + math.cos(math.pi * min(1.0, frac))) * 0.9 + 0.1)


def train_unet(cfg: ToyTrainConfig, data: dict, latents: dict) -> tuple[UNet2DConditionModel, torch.nn.Module]:
    """Stage 2: epsilon-prediction loss, caption dropout, EMA; resumes from ``work/unet.pt``."""
    work = Path(cfg.work)
    ckpt_path = work / "unet.pt"
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer))
    unet = build_unet(text_encoder.config.hidden_size)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = sd_scheduler()
    alphas = sched.alphas_cumprod
    step, elapsed = 0, 0.0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path)
        unet.load_state_dict(ck["unet"])
        text_encoder.load_state_dict(ck["text"])
        ema_unet.load_state_dict(ck["ema_unet"])
        ema_text.load_state_dict(ck["ema_text"])
        opt.load_state_dict(ck["opt"])
        step, elapsed = ck["step"], ck["elapsed"]
    keep = (~data["held_out"]).nonzero().squeeze(1)
    captions = data["captions"]
    keep_multi = keep[_two_object([captions[i] for i in keep.tolist()])]
    ids = tokenizer(
        captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    null_ids = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
    scaling = latents["scaling_factor"]
    masks = None
    if cfg.unet_object_weight > 0:
        masks = latent_object_masks(data["rgb"], data["rgb"].shape[-1] // latents["mean"].shape[-1])
    budget = cfg.unet_minutes * 60
    gen = torch.Generator().manual_seed(cfg.seed + step)
    bar = tqdm(total=int(budget), initial=int(min(elapsed, budget)), desc="unet", unit="s")
    last_ck = time.time()
    while elapsed < budget:
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = unet_lr_at(cfg, step, elapsed)
        idx = _draw_batch(keep, keep_multi, cfg.unet_batch, cfg.unet_multi_fraction, gen)
        z0 = latents["mean"][idx] * scaling  # the posterior mean, which the prior's encode_images also uses
        batch_ids = ids[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < cfg.caption_dropout
        batch_ids[drop] = null_ids
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        emb = text_encoder(batch_ids).last_hidden_state
        err = (unet(zt, t, emb).sample - noise).square()
        if masks is not None:  # objects are small on a white page: weight their latents up, as the VAE does
            weight = 1 + cfg.unet_object_weight * masks[idx].float()
            loss = (weight * err).mean() / weight.mean()
        else:
            loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        elapsed += time.time() - t0
        bar.update(int(elapsed) - bar.n)
        bar.set_postfix(step=step, loss=f"{loss.item():.4f}")
        if time.time() - last_ck > cfg.checkpoint_every_s or elapsed >= budget:
            _save_atomic(
                {
                    "unet": unet.state_dict(),
                    "text": text_encoder.state_dict(),
                    "ema_unet": ema_unet.state_dict(),
                    "ema_text": ema_text.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "elapsed": elapsed,
                },
                ckpt_path,
            )
            last_ck = time.time()
    bar.close()
    print(f"unet: {step} steps in {elapsed / 60:.1f} min")
    return ema_unet, ema_text


def export_pipeline(
    vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: torch.nn.Module, scaling_factor: float, out: Path
) -> Path:
    """Save a Stable-Diffusion-format pipeline in float16 safetensors."""
    vae.register_to_config(scaling_factor=scaling_factor)
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(),
        text_encoder=copy.deepcopy(text_encoder).half(),
        tokenizer=build_tokenizer(),
        unet=copy.deepcopy(unet).half(),
        scheduler=DDIMScheduler.from_config(sd_scheduler().config, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def train(cfg: ToyTrainConfig) -> Path:
    """The VAE, the decoder fine-tune (if any), the UNet, then the export; every stage resumes from ``cfg.work``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    paths = sorted(Path(cfg.cache).glob("chunk_*.pt"))
    if not paths:
        raise FileNotFoundError(f"no rendered chunks in {cfg.cache}; run `python -m lods toy-prior render` first")
    data = load_cache(paths)
    print(
        f"training on {len(data['captions'])} renders ({int(data['held_out'].sum())} held-out ones unused by the UNet)"
    )
    vae = train_vae(cfg, data)
    latents = encode_cache(vae, data, work / f"latents_{len(paths)}.pt")
    vae = finetune_decoder(cfg, vae, data, latents)
    unet, text_encoder = train_unet(cfg, data, latents)
    return export_pipeline(vae, unet, text_encoder, latents["scaling_factor"], Path(cfg.out))
