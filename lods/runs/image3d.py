"""Image-to-3D (the paper's section 4.2, after Magic123): one input image, its view as the reference camera.

The loss of a step is, for the renders of the step's random cameras and one render at the input camera::

    rgb_weight  * MSE(render at the input camera, input on white)          the reference view
  + mask_weight * MSE(its alpha, the input's foreground mask)
  + text_weight * the text prior's estimator loss (LODS-embed by default)   texture
  + view_weight * the view-conditioned prior's SDS on the novel views       shape (Zero-1-to-3)

with Magic123's weights (:class:`~lods.config.Image3DConfig`). The foreground mask comes from the image's
alpha channel, else from its background colour (the median of its border). An input written by
:func:`world_input` carries a sidecar JSON (``IN.json``) with its camera and its world scene, so that the run
writes the world's true novel views beside the generated ones and measures them (PSNR, the judge).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lods.cameras import Cameras, orbit
from lods.config import RunConfig
from lods.errors import UserError
from lods.export import atomic_path, image_grid, write_png
from lods.guidance import detached_target_loss
from lods.runs.folder import prepare_out
from lods.runs.generation import read_image
from lods.trainer import PriorCache, Trainer, load_prior, resolve_device

MAX_INPUT_PIXELS = 4096 * 4096
NORMALIZED = ("sds-norm", "lods-embed", "lods-lora")  # Eq. 3 divided by the CFG weight (Eqs. 7 and 9)
DEFAULT_CAMERA = {"elevation": 20.0, "azimuth": 0.0, "distance": 2.85, "fovy": 42.5}
NOVEL_AZIMUTHS = (90.0, 180.0, 270.0)  # novel_views.png: the input azimuth plus these, at elevation 20


@dataclasses.dataclass
class InputImage:
    rgb: torch.Tensor  # (1, 3, S, S) in [0, 1], composited on white
    mask: torch.Tensor  # (1, 1, S, S) in {0, 1}
    sidecar: dict[str, Any]  # the world's record of the image (camera, caption, scene), or {}


def load_input_image(path: str | Path, size: int, background_tol: float = 0.08) -> InputImage:
    """The input image at ``size`` x ``size`` (padded square with its background), its foreground mask, and its
    sidecar JSON if any; a one-line ``UserError`` for a missing, unreadable, truncated or huge file or an image
    with no foreground."""
    path = Path(path)

    def read(opened: Any) -> tuple[bool, np.ndarray]:
        w, h = opened.size
        if w * h > MAX_INPUT_PIXELS:
            raise UserError(f"{path} is too large to be an input image ({w}x{h} pixels; at most "
                            f"{MAX_INPUT_PIXELS:,} pixels)")
        return ("A" in opened.getbands() or "transparency" in opened.info,
                np.asarray(opened.convert("RGBA"), dtype=np.float32) / 255)

    has_alpha, img = read_image(path, read)
    rgb, alpha = torch.from_numpy(img[..., :3]).permute(2, 0, 1), torch.from_numpy(img[..., 3])
    if has_alpha and alpha.min() < 0.99:
        mask = alpha
        background = torch.ones(3)
    else:
        border = torch.cat([rgb[:, 0], rgb[:, -1], rgb[:, :, 0], rgb[:, :, -1]], 1)
        background = border.median(1).values
        mask = ((rgb - background.view(3, 1, 1)).abs().amax(0) > background_tol).float()
    rgb = rgb * mask + background.view(3, 1, 1) * (1 - mask)
    side = max(rgb.shape[1:])
    pad = [(side - rgb.shape[2]) // 2, (side - rgb.shape[2] + 1) // 2, (side - rgb.shape[1]) // 2,
           (side - rgb.shape[1] + 1) // 2]
    rgb = torch.stack([F.pad(rgb[c], pad, value=float(background[c])) for c in range(3)])
    mask = F.pad(mask, pad, value=0.0)
    rgb = F.interpolate(rgb[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mask = F.interpolate(mask[None, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mask = (mask > 0.5).float()
    if mask.sum() < 4:
        raise UserError(f"{path} has no foreground: every pixel is transparent or the background colour")
    rgb = rgb * mask + (1 - mask)  # on white, as the renders are trained
    sidecar: dict[str, Any] = {}
    side_path = path.with_suffix(".json")
    if side_path.is_file():
        try:
            sidecar = json.loads(side_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{side_path} is not valid JSON ({str(err)[:80]})") from err
        if not isinstance(sidecar, dict):
            raise UserError(f"{side_path} must hold a JSON object")
    return InputImage(rgb.clamp(0, 1), mask, sidecar)


def reference_camera(config: RunConfig, sidecar: dict[str, Any], size: int) -> Cameras:
    """The input camera: the config's ``image3d.ref_*`` where set, else the sidecar's, else ``DEFAULT_CAMERA``."""
    values = {}
    for key, default in DEFAULT_CAMERA.items():
        own = getattr(config.image3d, f"ref_{key}")
        values[key] = float(own if own is not None else sidecar.get(key, default))
    return orbit(*(torch.tensor([values[k]]) for k in ("azimuth", "elevation", "distance", "fovy")), size, size)


def caption_from_judge(image: torch.Tensor) -> str:
    """A toy-world caption of ``image`` (1, 3, 64, 64) as the judge reads it."""
    from lods.priors.toy.judge import GROUND_CLASSES, detected_sets, shipped_judge
    from lods.priors.toy.world import Scene, WorldObject

    judge = shipped_judge()
    with torch.no_grad():
        combo, ground = judge(F.interpolate(image.float(), size=(64, 64), mode="bilinear", antialias=True))
    pairs = sorted(detected_sets(combo)[0])[:2]
    ground_name = GROUND_CLASSES[int(ground.argmax(1)[0])]
    objects = tuple(WorldObject(c, s) for c, s in pairs)
    scene = Scene(objects, ground_name if ground_name != "none" and len(objects) == 1 else None)
    return scene.caption


class ImageTo3DTrainer(Trainer):
    """The text-to-3D trainer with the input view's losses and the view-conditioned prior's SDS added."""

    def __init__(self, config: RunConfig, image: InputImage, view_prior: Any, prior: Any = None,
                 out_dir: str | Path | None = None) -> None:
        super().__init__(config, prior=prior, out_dir=out_dir)
        if self.knobs.text_weight is None:  # an input given here, not by path in the config: the weights turn too
            self.knobs = dataclasses.replace(self.knobs, text_weight=config.image3d.text_weight,
                                             view_weight=config.image3d.view_weight)
        self.input = image
        self.ref_camera = reference_camera(config, image.sidecar, self.resolution).to(self.device)
        self.ref_rgb = F.interpolate(image.rgb, size=(self.resolution,) * 2, mode="bilinear", antialias=True,
                                     align_corners=False).to(self.device)
        self.ref_mask = (F.interpolate(image.mask, size=(self.resolution,) * 2, mode="bilinear",
                                       align_corners=False) > 0.5).float().to(self.device)
        self.view_prior = view_prior
        cam = self.ref_camera
        view_prior.set_reference(image.rgb, float(cam.elevation[0]), float(cam.azimuth[0]), float(cam.distance[0]))
        self.view_reference = view_prior.reference  # this run's input, set again before each use (a shared prior)
        # The live previews: the input camera first, then the novel views that novel_views.png shows.
        self.preview_cameras = input_and_novel_cameras(self.ref_camera.to("cpu"), self.resolution)
        # The world's true views from the novel cameras where the input is a world render (its sidecar), else None
        self.true_views = world_truth(image.sidecar, self.preview_cameras[1:])
        self.view_gen = torch.Generator().manual_seed(config.seed + 1)
        self.view_null: torch.Tensor | None = None
        if config.image3d.view_method == "lods-embed":
            width = int(view_prior.unet.config.cross_attention_dim)
            self.view_null = torch.zeros(1, 1, width, device=self.device, requires_grad=True)
            self.view_opt = torch.optim.Adam([self.view_null], lr=config.image3d.view_lr)

    def reference_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """MSE of the render at the input camera against the input (on white), and of its alpha against the mask."""
        out = self.scene.render(self.ref_camera, torch.ones(1, 3, device=self.device))
        rgb = F.mse_loss(out.rgb.float(), self.ref_rgb)
        mask = F.mse_loss(out.alpha.float().clamp(0, 1), self.ref_mask)
        return rgb, mask

    def view_loss(self, rgb: torch.Tensor, cams: Cameras) -> tuple[torch.Tensor, dict[str, float]]:
        """The view-conditioned prior's SDS (or LODS on its null token) on the step's renders."""
        cfg = self.config.image3d
        vp = self.view_prior
        vp.reference = self.view_reference  # the runs of a comparison share one view prior
        el, az, dist = cams.elevation, cams.azimuth, cams.distance
        if self.view_null is None:
            return vp.sds_loss(rgb, el, az, dist, guidance_scale=cfg.view_cfg, generator=self.view_gen), {}
        z = vp.encode_images(rgb).float()
        n = len(z)
        t = torch.randint(20, 980, (n,), generator=self.view_gen).to(self.device)
        noise = torch.randn(z.shape, generator=self.view_gen).to(self.device)
        ab = vp.alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = ab.sqrt() * z.detach() + (1 - ab).sqrt() * noise
        ctx = vp.context(el, az, dist)
        concat = vp.reference["concat"].expand(n, -1, -1, -1)
        with torch.no_grad():
            eps_c = vp._eps(z_t, t, concat, ctx)
            eps_null = vp._eps(z_t, t, torch.zeros_like(concat), self.view_null.detach().expand(n, -1, -1))
        w = cfg.view_cfg
        direction = eps_c + (1 - w) / w * eps_null - noise / w  # Eq. 7 on the view prior
        loss = detached_target_loss(z, w * (1 - ab) * direction)  # times w: the scale of SDS at weight w
        # Eq. 8: the null token learns to denoise the renders.
        pred = vp._eps(z_t, t, torch.zeros_like(concat), self.view_null.expand(n, -1, -1))
        null_loss = F.mse_loss(pred, noise)
        self.view_opt.zero_grad(set_to_none=True)
        null_loss.backward()
        self.view_opt.step()
        return loss, {"view_null_loss": float(null_loss.detach())}

    def total_loss(self, g: Any, cams: Cameras, out: Any, knobs: Any) -> tuple[torch.Tensor, dict]:
        cfg = self.config.image3d
        text = g.loss
        if cfg.text_times_cfg and self.config.method in NORMALIZED and np.isfinite(knobs.cfg):
            text = text * knobs.cfg
        rgb_loss, mask_loss = self.reference_loss()
        text_weight, view_weight = knobs.text_weight, knobs.view_weight  # live knobs, from cfg at the start
        if view_weight > 0:
            view, extra = self.view_loss(out.rgb, cams)
        else:
            view, extra = torch.zeros((), device=self.device), {}
        total = (text_weight * text + cfg.rgb_weight * rgb_loss + cfg.mask_weight * mask_loss
                 + view_weight * view)
        return total, {"ref_rgb_loss": float(rgb_loss.detach()), "ref_mask_loss": float(mask_loss.detach()),
                       "view_sds_loss": float(view.detach()), **extra}


    def reference_row(self) -> torch.Tensor:
        """(1 + novel views, 3, R, R): the input, then the world's true views at the preview cameras' novel
        azimuths where the input is a world render (white otherwise), for the page above the live previews."""
        truth = self.true_views if self.true_views is not None else torch.ones(len(self.preview_cameras) - 1, 3,
                                                                               self.resolution, self.resolution)
        return torch.cat([self.ref_rgb.float().cpu(), truth.float()])

    def export_extra(self, out: Path) -> tuple[dict[str, Any], list[str]]:
        """``reference.png`` (the input and its mask) and ``novel_views.png`` with their measures."""
        inp = self.input
        write_png(out / "reference.png", image_grid(torch.cat([inp.rgb, inp.mask.expand(-1, 3, -1, -1)]), cols=2))
        return {"image3d": novel_views(self, out)}, ["reference.png", "novel_views.png"]


def input_and_novel_cameras(ref: Cameras, size: int) -> Cameras:
    """The input camera, then the input azimuth plus ``NOVEL_AZIMUTHS`` at elevation 20 (the world's default
    distance and field of view)."""
    k = len(NOVEL_AZIMUTHS)
    az = torch.tensor([float(ref.azimuth[0]) + a for a in NOVEL_AZIMUTHS])
    return orbit(torch.cat([ref.azimuth[:1].float(), az]),
                 torch.cat([ref.elevation[:1].float(), torch.full((k,), 20.0)]),
                 torch.cat([ref.distance[:1].float(), torch.full((k,), DEFAULT_CAMERA["distance"])]),
                 torch.cat([torch.rad2deg(ref.fovy[:1].float()), torch.full((k,), DEFAULT_CAMERA["fovy"])]),
                 size, size)


def load_view_prior(name: str, device: torch.device):
    from lods.priors.views import ViewConditionedPrior

    return ViewConditionedPrior.from_pretrained(name, device=device)


view_priors = PriorCache(load_view_prior)  # the app's and the comparisons' runs share the last one loaded


def with_image(config: RunConfig, image: str | Path) -> RunConfig:
    """``config`` as an image-to-3D run of ``image``: its path in ``image3d.input_image`` and, on the toy prior, an
    empty prompt filled with the input's caption (its sidecar's, else the judge's reading). A one-line
    ``UserError`` for a bad image, a 2D backbone, or an empty prompt on a prior that cannot caption."""
    if config.backbone not in ("gs", "nerf"):
        raise UserError(f"image-to-3D needs a 3D backbone (gs or nerf), not {config.backbone!r}")
    inp = load_input_image(image, 64)  # read and checked once here, before any run starts
    prompt = config.prompt if isinstance(config.prompt, str) else ""
    if not prompt.strip():
        if config.prior != "toy":
            raise UserError("a prompt is needed with this prior (only the toy world can caption an image)")
        prompt = inp.sidecar.get("caption") or caption_from_judge(inp.rgb)
    return dataclasses.replace(config, prompt=prompt,
                               image3d=dataclasses.replace(config.image3d, input_image=str(image)))


def build_trainer(config: RunConfig, prior: Any, out_dir: str | Path | None = None, view_prior: Any = None
                  ) -> Trainer:
    """The trainer of ``config``: image-to-3D where ``config.image3d.input_image`` is set, else text-to-3D."""
    if not config.image3d.input_image:
        return Trainer(config, prior=prior, out_dir=out_dir)
    inp = load_input_image(config.image3d.input_image, prior.image_size)
    view_prior = view_prior or view_priors(config.image3d.view_prior, resolve_device(config.device))
    return ImageTo3DTrainer(config, inp, view_prior, prior=prior, out_dir=out_dir)


def generate_from_image(config: RunConfig | dict[str, Any], image: str | Path, out: str | Path, prior: Any = None,
                        view_prior: Any = None, progress: bool = True, video: bool = True) -> dict[str, Any]:
    """Image to 3D into the run folder ``out``: the text-to-3D outputs plus ``reference.png`` (the input and its
    mask) and ``novel_views.png`` (generated novel views, beside the world's true ones where known). An empty
    prompt on the toy prior takes the judge's caption of the input. Returns the summary."""
    from lods.runs.generation import run_and_export, with_preset

    if not isinstance(config, RunConfig):
        config = dict(config)
        config.setdefault("prompt", "")
        config = RunConfig.from_dict(with_preset(config))
    config = with_image(config, image)
    config.validate()
    device = resolve_device(config.device)
    prior = prior or load_prior(config.prior, device)
    out = prepare_out(out)
    trainer = build_trainer(config, prior, out_dir=out, view_prior=view_prior)
    t0 = time.perf_counter()
    summary = run_and_export(trainer, out, show_progress=progress, video=video)
    summary["image3d"]["seconds_with_export"] = round(time.perf_counter() - t0, 1)
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str))
    return summary


@torch.no_grad()
def novel_views(trainer: ImageTo3DTrainer, out: Path) -> dict[str, Any]:
    """``novel_views.png``: row 1 the input and the world's true views (where known), row 2 the render at the
    input camera and the generated views; the input azimuth plus ``NOVEL_AZIMUTHS`` at elevation 20. Returns
    the PSNR of the reference render and, where the truth is known, the novel views' PSNR and the judge's
    verdict on them."""
    from lods.priors.toy.views import psnr

    k = len(NOVEL_AZIMUTHS)
    both = trainer.render_views(trainer.preview_cameras.to(trainer.device)).rgb.float().cpu()
    ref_render, made = both[:1], both[1:]
    report: dict[str, Any] = {"reference_psnr": psnr(ref_render[0], trainer.ref_rgb[0].cpu()),
                              "novel_azimuths": list(NOVEL_AZIMUTHS)}
    truth = trainer.true_views
    write_png(out / "novel_views.png", image_grid(torch.cat([trainer.reference_row(), ref_render, made]), cols=k + 1))
    if truth is not None:
        from lods.priors.toy.judge import judge_images, shipped_judge

        caption = trainer.input.sidecar["caption"]
        report["novel_psnr"] = [psnr(a, b) for a, b in zip(made, truth)]
        report["novel_psnr_mean"] = float(np.mean(report["novel_psnr"]))
        judge = shipped_judge()
        small = F.interpolate(made, size=(64, 64), mode="bilinear", antialias=True)
        right = judge_images(judge, small, [caption] * k)["objects_right"]
        report["novel_judged_right"] = float(right.float().mean())
        # A perceptual distance that needs no download: 1 - cosine similarity of the judge's pooled features.
        feats = judge.features(torch.cat([small, F.interpolate(truth, size=(64, 64), mode="bilinear",
                                                                antialias=True)]))
        report["novel_feature_distance"] = float((1 - F.cosine_similarity(feats[:k], feats[k:], dim=1)).mean())
    return report


def world_truth(sidecar: dict[str, Any], cams: Cameras) -> torch.Tensor | None:
    """The world's renders of the sidecar's scene from ``cams``, or None when the image is not a world render."""
    if "caption" not in sidecar or "placement_seed" not in sidecar:
        return None
    from lods.priors.toy.views import render_views
    from lods.priors.toy.world import parse_caption

    return render_views(parse_caption(sidecar["caption"]), cams, int(sidecar["placement_seed"]))


def world_input(out: str | Path, held_out_index: int = 0, size: int = 64) -> Path:
    """A world render as an input image: ``out`` (RGBA PNG) and its sidecar ``out.json`` (caption, camera,
    placement seed). Scene ``held_out_index`` of the view-conditioned prior's held-out stream, seen from the
    stream's random camera."""
    import random

    from PIL import Image

    from lods.cameras import sample_cameras
    from lods.priors.toy.views import EVAL_SEED, held_out_scene
    from lods.priors.toy.world import render_scenes

    scene = held_out_scene(held_out_index)
    seed = EVAL_SEED + held_out_index
    cam = sample_cameras(1, size, generator=torch.Generator().manual_seed(seed))
    r = render_scenes([scene], cam, random.Random(seed))
    rgba = torch.cat([r.rgb[0], r.alpha[0][None]]).permute(1, 2, 0).numpy()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(out)
    side = {"caption": scene.caption, "placement_seed": seed, "elevation": float(cam.elevation[0]),
            "azimuth": float(cam.azimuth[0]), "distance": float(cam.distance[0]),
            "fovy": float(torch.rad2deg(cam.fovy[0]))}
    out.with_suffix(".json").write_text(json.dumps(side, indent=2) + "\n")
    return out
