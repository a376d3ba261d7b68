"""Inside one step: what the score-distillation update of a trainer's current scene is made of, at a chosen t.

For one preview view of the live scene, :func:`look_inside` noises its latents to ``z_t`` (its own
generator: the run's random state is never touched) and asks the prior for the predictions the update
is built from: eps(y), eps(null), the learned one where the method learns (eps(alpha) for LODS-embed,
the LoRA model at its scale for LODS-LoRA, VSD's camera-conditioned LoRA) and the guided prediction at
the run's current weight. Each is shown as the clean image it implies in one denoising step
(``x0_from_eps``, decoded), beside the render and the noisy latent; the parts of the update
(:func:`lods.guidance.update_parts`: the classifier term eps(y) - eps(null), the denoising term
eps(null) - eps, the LODS drift eps(learned) - eps(null), norms, cosines, the effective CFG) come with
them, and the estimator's formula with its live constants.

Training is not disturbed: everything runs without gradients under the trainer's ``scene_lock`` (which a
training step holds too, so the look waits for the step in progress and delays the next by its own
length, a few UNet passes), calls the prior directly (the estimator's pass counters and kept tensors
stay as they are) and draws its noise from its own generator.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lods.errors import UserError
from lods.guidance import (
    CfgRescale,
    Dds,
    Ism,
    LodsEmbed,
    LodsLora,
    Sds,
    SdsNorm,
    SdsRef,
    Vsd,
    _camera_labels,
    cfg_combine,
    cfg_rescale,
    eps_from_x0,
    sds_direction,
    sds_norm_direction,
    update_parts,
    vsd_direction,
    x0_from_eps,
)

# Names of the panels, in the order they are shown.
RENDER, NOISY, COND, NULL, GUIDED = "render", "noisy z_t", "x0 | eps(y)", "x0 | eps(null)", "x0 | guided"


@dataclass
class Inside:
    """What :func:`look_inside` saw: images (name -> (H, W, 3) uint8, in display order), the parts of the
    update (floats), the formula (Markdown with LaTeX) and where it looked."""

    step: int
    t: int
    view: int
    cfg: float
    method: str
    images: dict[str, np.ndarray]
    parts: dict[str, float]
    formula: str
    notes: list[str] = field(default_factory=list)

    def strip(self, min_side: int = 128, gap: int = 6) -> np.ndarray:
        """The images side by side on white, each enlarged (nearest neighbour) to at least ``min_side``."""
        tiles = []
        for img in self.images.values():
            f = max(1, math.ceil(min_side / img.shape[0]))
            tiles.append(img.repeat(f, axis=0).repeat(f, axis=1))
        h = max(t.shape[0] for t in tiles)
        out = np.full((h, sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1), 3), 255, np.uint8)
        x = 0
        for tile in tiles:
            out[: tile.shape[0], x: x + tile.shape[1]] = tile
            x += tile.shape[1] + gap
        return out

    def summary(self) -> dict[str, Any]:
        """The JSON-able part: where, the parts, the formula, the image names."""
        return {"step": self.step, "t": self.t, "view": self.view, "cfg": self.cfg, "method": self.method,
                "images": list(self.images), "parts": self.parts, "formula": self.formula, "notes": self.notes}

    def write(self, out: str | Path) -> list[Path]:
        """``inside.png`` (the strip) and ``parts.json`` in ``out``."""
        from lods.export import write_png

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        png = write_png(out / "inside.png", self.strip())
        js = out / "parts.json"
        js.write_text(json.dumps(self.summary(), indent=1, default=float))
        return [png, js]


def learned_label(estimator: Any) -> str | None:
    """The name of the learned prediction's panel, or None for methods that learn no prediction."""
    if isinstance(estimator, LodsEmbed):
        return "x0 | eps(alpha)"
    if isinstance(estimator, LodsLora):
        return f"x0 | LoRA x{estimator.config.lora_scale:g}"
    if isinstance(estimator, Vsd):
        return "x0 | VSD LoRA"
    return None


def _learned_eps(estimator, prior, z_t, t, text, null, cameras) -> torch.Tensor | None:
    if isinstance(estimator, LodsEmbed):
        alpha = estimator.alpha if estimator.alpha is not None else null[:1]
        return prior.predict_noise(z_t, t, alpha.detach().to(prior.dtype).expand(z_t.shape[0], -1, -1))
    if isinstance(estimator, LodsLora):
        with prior.lora_scale(estimator.adapter, estimator.config.lora_scale):
            return prior.predict_noise(z_t, t, null)
    if isinstance(estimator, Vsd):
        with prior.lora_scale(estimator.adapter, 1.0):
            return prior.predict_noise(z_t, t, text, _camera_labels(cameras, z_t.shape[0], z_t.device))
    return None


def _guided_and_direction(estimator, z_t, noise, ab, eps_c, eps_u, eps_l, cfg: float, step: int):
    """The guided noise prediction at the live weight (None at w = inf) and the method's unweighted direction
    (None where it is not built on the added noise), computed as the estimator does without calling it."""
    if isinstance(estimator, (LodsEmbed, LodsLora)):
        guided = None if math.isinf(cfg) else cfg_combine(eps_c, eps_l, cfg)
        return guided, sds_norm_direction(eps_c, eps_l, noise, cfg)
    if isinstance(estimator, SdsRef):
        return eps_c, eps_c - noise
    if isinstance(estimator, SdsNorm):
        guided = None if math.isinf(cfg) else cfg_combine(eps_c, eps_u, cfg)
        return guided, sds_norm_direction(eps_c, eps_u, noise, cfg)
    if math.isinf(cfg):
        return None, None
    if isinstance(estimator, Vsd):
        guided = cfg_combine(eps_c, eps_u, cfg)
        return guided, vsd_direction(guided, eps_l)
    if isinstance(estimator, (Ism, Dds)):
        return cfg_combine(eps_c, eps_u, estimator.cfg_at(cfg, step) if isinstance(estimator, Sds) else cfg), None
    if isinstance(estimator, CfgRescale):
        w = estimator.cfg_at(cfg, step)
        x0 = cfg_rescale(x0_from_eps(z_t, cfg_combine(eps_c, eps_u, w), ab), x0_from_eps(z_t, eps_c, ab),
                         estimator.config.rescale_phi)
        guided = eps_from_x0(z_t, x0, ab)
        return guided, sds_direction(guided, noise)
    if isinstance(estimator, Sds):
        guided = cfg_combine(eps_c, eps_u, estimator.cfg_at(cfg, step))
        return guided, sds_direction(guided, noise)
    return None, None


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


@torch.no_grad()
def look_inside(trainer: Any, t: int = 500, view: int = 0, seed: int = 0) -> Inside:
    """Inside one step of ``trainer`` (a :class:`~lods.trainer.Trainer`) at timestep ``t`` for preview view
    ``view``, with noise from ``seed``; safe to call from another thread while the trainer trains."""
    prior = trainer.prior
    T = prior.num_train_timesteps
    views = len(trainer.preview_cameras)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= int(t) < T:
        raise UserError(f"t must be a whole number from 0 to {T - 1}, not {t!r}")
    if isinstance(view, bool) or not isinstance(view, (int, float)) or not 0 <= int(view) < views:
        raise UserError(f"view must be from 0 to {views - 1}, not {view!r}")
    t, view = int(t), int(view)
    with trainer.lock:
        cfg = trainer.knobs.cfg
    cams = trainer.preview_cameras[view: view + 1]
    device = trainer.device
    with trainer.scene_lock:
        trainer.join_update()  # the learned parameters as the last step's update left them
        est, scene, step = trainer.estimator, trainer.scene, trainer.step
        # the scene's display mode (no jitter) and a forked RNG, as for the previews
        background = torch.ones(1, 3, device=device) if trainer.config.background in ("white", "random") else None
        was_training = scene.training
        scene.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                z, out = scene.latents(prior, cams.to(device), background)
                render = out.rgb if out is not None else scene.previews(prior, cams, background).rgb
        finally:
            scene.train(was_training)
        z = z.detach().float()
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn(z.shape, generator=gen).to(device)
        tt = torch.full((1,), t, device=device, dtype=torch.long)
        ab = prior.alphas_cumprod[tt].to(device, torch.float32)
        z_t = prior.add_noise(z, noise, tt).float()
        text = trainer.text_embeddings(cams).to(device)
        null = trainer.null_emb[:1].to(device)
        eps_c, eps_u = prior.predict_noise(torch.cat([z_t, z_t]), torch.cat([tt, tt]),
                                           torch.cat([text.to(prior.dtype), null.to(prior.dtype)])).float().chunk(2)
        try:
            eps_l = _learned_eps(est, prior, z_t, tt, text, null, cams)
        except ValueError as err:  # the adapter went when the run ended (Trainer.close)
            raise UserError(f"this run's LoRA is no longer attached to the prior (the run has ended); look inside "
                            f"while it runs, or with `python -m lods inside` on its checkpoint ({err})") from err
        eps_l = eps_l.float() if eps_l is not None else None
        guided, direction = _guided_and_direction(est, z_t, noise, ab, eps_c, eps_u, eps_l, cfg, step)
        latents = {COND: eps_c, NULL: eps_u}
        label = learned_label(est)
        if label is not None and eps_l is not None:
            latents[label] = eps_l
        if guided is not None:
            latents[GUIDED] = guided
        decoded = {name: prior.decode_latents(x0_from_eps(z_t, eps, ab)) for name, eps in latents.items()}
        noisy = prior.decode_latents(z_t)
        formula = est.formula(cfg, step)
    images = {RENDER: _to_uint8(render), NOISY: _to_uint8(noisy)}
    images.update({name: _to_uint8(img) for name, img in decoded.items()})
    lods_drift = eps_l if isinstance(est, (LodsEmbed, LodsLora)) else None
    if direction is not None:
        parts = update_parts(direction, eps_c, eps_u, noise, lods_drift)
    else:
        parts = {k: v for k, v in update_parts(eps_c - noise, eps_c, eps_u, noise).items()
                 if not k.startswith("eff_cfg")}
    parts.update(t=float(t), alpha_bar=float(ab), cfg=float(cfg))
    notes = []
    if guided is None:
        notes.append("no guided prediction at w = inf (its one-step image is undefined)")
    if direction is None:
        notes.append(f"{est.method}'s direction is not built on the added noise: no effective CFG")
    return Inside(step=step, t=t, view=view, cfg=float(cfg), method=est.method, images=images, parts=parts,
                  formula=formula, notes=notes)


def load_trainer(checkpoint_path: str | Path, prior: Any = None) -> Any:
    """A trainer rebuilt from a checkpoint (a file or a run folder), to look inside a finished run."""
    from lods.config import RunConfig
    from lods.runs.generation import checkpoint_config
    from lods.trainer import Trainer, shared_prior

    config = RunConfig.from_dict(checkpoint_config(checkpoint_path))
    trainer = Trainer(config, prior=prior or shared_prior(config.prior, config.device))
    trainer.load_checkpoint(checkpoint_path)
    return trainer
