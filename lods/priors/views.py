"""View-conditioned diffusion priors (Zero-1-to-3 / Zero123-XL / Stable Zero123) in diffusers layout.

The folder (local, or a Hugging Face Hub id) holds the components the diffusers Zero-1-to-3 pipeline uses::

    unet/               UNet2DConditionModel, in_channels 8: the noisy latent concatenated with the
                        input view's latent (the VAE posterior mode, unscaled)
    vae/                AutoencoderKL
    image_encoder/      CLIPVisionModelWithProjection (its ``image_embeds`` describe the input view)
    cc_projection/      CCProjection: a Linear (embedding width + 4 -> cross_attention_dim)
    feature_extractor/  CLIPImageProcessor (resolution, mean and std of the image encoder's input)
    scheduler/          a DDPM-compatible config (only its noise schedule is used)

The cross-attention context is one token, ``cc_projection([image_embeds, camera])`` with the relative camera
``[polar change (rad), sin(azimuth change), cos(azimuth change), radius change]`` (Zero-1-to-3); Stable Zero123
puts the input's polar angle (rad) in the last slot instead (``camera_mode="stable"``). The unconditional branch
of classifier-free guidance gets zeros for both the context and the concatenated latent, as in the diffusers
pipeline. Only ``.safetensors`` weights are read and no remote code is run.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from lods.errors import one_line
from lods.priors.base import PriorError
from lods.priors.diffusers_prior import HUB_ID, load_diffusers_model, load_part, resolve_dtype

COMPONENTS = ("unet", "vae", "image_encoder", "cc_projection", "feature_extractor", "scheduler")
CAMERA_MODES = ("zero123", "stable")
TOY_VIEWS = Path(__file__).resolve().parent / "toy" / "weights" / "views"
ALIASES = {"toy-views": str(TOY_VIEWS), "zero123-xl": "kxic/zero123-xl"}
_HUB_IGNORE = ["*.bin", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.pb", "*.fp16.*", "*non_ema*", "*.ema.*"]


class CCProjection(ModelMixin, ConfigMixin):
    """The camera projection of the diffusers Zero-1-to-3 pipeline (same name, config and weight keys)."""

    @register_to_config
    def __init__(self, in_channel: int = 772, out_channel: int = 768):
        super().__init__()
        self.projection = nn.Linear(in_channel, out_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


def relative_camera(
    elevation: torch.Tensor,
    azimuth: torch.Tensor,
    distance: torch.Tensor,
    ref_elevation: float | torch.Tensor,
    ref_azimuth: float | torch.Tensor,
    ref_distance: float | torch.Tensor,
    mode: str = "zero123",
) -> torch.Tensor:
    """(B, 4) camera vectors of target views (degrees, world units) relative to the input view's camera.

    Zero-1-to-3 measures polar angles from the zenith, so the first entry is ``ref_elevation - elevation``
    in radians; ``mode="stable"`` (Stable Zero123) replaces the radius change by the input's polar angle.
    """
    el, az, dist = (torch.as_tensor(v, dtype=torch.float32) for v in (elevation, azimuth, distance))
    d_polar = torch.deg2rad(torch.as_tensor(ref_elevation, dtype=torch.float32) - el)
    d_az = torch.deg2rad(az - torch.as_tensor(ref_azimuth, dtype=torch.float32))
    if mode == "stable":
        last = torch.deg2rad(90.0 - torch.as_tensor(ref_elevation, dtype=torch.float32)).expand_as(el)
    elif mode == "zero123":
        last = dist - torch.as_tensor(ref_distance, dtype=torch.float32)
    else:
        raise PriorError(f"unknown camera mode '{mode}'; use one of {', '.join(CAMERA_MODES)}")
    return torch.stack([d_polar.expand_as(el), torch.sin(d_az), torch.cos(d_az), last.expand_as(el)], -1)


def clip_processor_class() -> type:
    """transformers' CLIP image processor: its PIL flavour where the library has one (the default flavour wants
    torchvision, which this project does not need, and warns at every load without it)."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def clip_pixels(images: torch.Tensor, feature_extractor) -> torch.Tensor:
    """Images in [0, 1] -> the image encoder's input, as ``CLIPImageProcessor`` makes it, but differentiable."""
    fe = feature_extractor
    size = fe.crop_size if getattr(fe, "do_center_crop", False) else fe.size
    if not isinstance(size, int):
        size = dict(size)
        size = size.get("height") or size.get("shortest_edge")
    x = F.interpolate(images.float(), size=(int(size), int(size)), mode="bilinear", align_corners=False,
                      antialias=images.shape[-1] > int(size))
    mean = torch.tensor(fe.image_mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(fe.image_std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


class ViewConditionedPrior:
    """A view-conditioned UNet seen as an epsilon oracle for novel views of one input image.

    Call :meth:`set_reference` with the input view and its camera, then :meth:`predict_noise` with target
    cameras. ``guidance_scale`` mixes the conditional prediction with the unconditional one (zero context,
    zero concatenated latent).
    """

    def __init__(self, unet, vae, image_encoder, cc_projection, feature_extractor, scheduler,
                 device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None,
                 camera_mode: str = "zero123"):
        if camera_mode not in CAMERA_MODES:
            raise PriorError(f"unknown camera mode '{camera_mode}'; use one of {', '.join(CAMERA_MODES)}")
        cfg = unet.config
        if int(cfg.in_channels) != 2 * int(vae.config.latent_channels):
            raise PriorError(f"the UNet takes {cfg.in_channels} channels; a view-conditioned UNet takes twice the "
                             f"VAE's {vae.config.latent_channels} latent channels")
        proj = cc_projection.projection
        width = int(getattr(image_encoder.config, "projection_dim", 0))
        if proj.in_features != width + 4 or proj.out_features != int(cfg.cross_attention_dim):
            raise PriorError(f"cc_projection maps {proj.in_features} -> {proj.out_features}; expected the image "
                             f"embedding ({width}) + 4 camera values -> the UNet's {cfg.cross_attention_dim}")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(self.device, dtype)
        for m in (unet, vae, image_encoder, cc_projection):
            m.requires_grad_(False)
            m.eval()
            if next(m.parameters()).dtype != self.dtype:
                m.to(dtype=self.dtype)
            m.to(self.device)
        self.unet, self.vae, self.image_encoder, self.cc_projection = unet, vae, image_encoder, cc_projection
        self.feature_extractor = feature_extractor
        self.camera_mode = camera_mode
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.v_prediction = scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
        sample = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.image_size = int(sample) * self.vae_scale_factor
        self.latent_shape = (int(vae.config.latent_channels), int(sample), int(sample))
        self.reference: dict[str, torch.Tensor | float] | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, id_or_dir: str, device: torch.device | str = "cpu",
                        dtype: torch.dtype | str | None = None, camera_mode: str | None = None):
        """Load a local folder, a hub id or ``toy-views`` (see the module docstring); safetensors only.

        ``camera_mode`` defaults to the folder's ``lods_prior.json`` "camera_mode", else "stable" when the
        name says Stable Zero123, else "zero123".
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPVisionModelWithProjection

        root = resolve_views_source(id_or_dir)
        check_views_folder(root)
        torch_dtype = resolve_dtype(torch.device(device), dtype)

        load = functools.partial(load_part, root)

        unet = load_diffusers_model(root, UNet2DConditionModel, "unet", torch_dtype)
        vae = load_diffusers_model(root, AutoencoderKL, "vae", torch_dtype)
        image_encoder = load("image_encoder/", lambda: CLIPVisionModelWithProjection.from_pretrained(
            root / "image_encoder", use_safetensors=True, dtype=torch_dtype))
        cc = load("cc_projection/", lambda: load_cc_projection(root / "cc_projection"))
        fe = load("feature_extractor/", lambda: clip_processor_class().from_pretrained(root / "feature_extractor"))
        scheduler = load("scheduler/", lambda: DDPMScheduler.from_pretrained(root, subfolder="scheduler"))
        if camera_mode is None:
            meta = root / "lods_prior.json"
            declared = json.loads(meta.read_text()).get("camera_mode") if meta.exists() else None
            camera_mode = declared or ("stable" if "stable" in str(id_or_dir).lower() else "zero123")
        return cls(unet, vae, image_encoder, cc, fe, scheduler, device, torch_dtype, camera_mode)

    # ------------------------------------------------------------------ conditioning
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> scaled latents (differentiable), resized to the model's size."""
        x = _resize(images, self.image_size).to(self.device, self.dtype) * 2 - 1
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.vae.decode(z.to(self.dtype) / self.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def set_reference(self, image: torch.Tensor, elevation: float, azimuth: float, distance: float) -> None:
        """The input view (1, 3, H, W) in [0, 1] and its camera (degrees, world units)."""
        image = image.to(self.device, self.dtype)
        embeds = self.image_encoder(clip_pixels(image, self.feature_extractor).to(self.dtype)).image_embeds
        concat = self.vae.encode(_resize(image, self.image_size) * 2 - 1).latent_dist.mode()
        self.reference = {"embeds": embeds[:1], "concat": concat[:1], "elevation": float(elevation),
                          "azimuth": float(azimuth), "distance": float(distance)}

    def context(self, elevation: torch.Tensor, azimuth: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """(B, 1, cross_attention_dim): the projected [image embedding, relative camera] of each target view."""
        ref = self._ref()
        cam = relative_camera(elevation, azimuth, distance, ref["elevation"], ref["azimuth"], ref["distance"],
                              self.camera_mode).to(self.device, self.dtype)
        emb = ref["embeds"].expand(len(cam), -1)
        return self.cc_projection(torch.cat([emb, cam], -1))[:, None]

    def _ref(self) -> dict:
        if self.reference is None:
            raise PriorError("no input view: call set_reference(image, elevation, azimuth, distance) first")
        return self.reference

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, elevation: torch.Tensor, azimuth: torch.Tensor,
                      distance: torch.Tensor, guidance_scale: float = 3.0) -> torch.Tensor:
        """Epsilon for noisy target latents ``z_t`` at ``t``; CFG with the null (zero) conditioning."""
        ref = self._ref()
        B = z_t.shape[0]
        ctx = self.context(elevation, azimuth, distance)
        concat = ref["concat"].expand(B, -1, -1, -1)
        if guidance_scale == 1.0:
            return self._eps(z_t, t, concat, ctx)
        zz = torch.cat([z_t, z_t])
        cc = torch.cat([torch.zeros_like(concat), concat])
        ctx2 = torch.cat([torch.zeros_like(ctx), ctx])
        uncond, cond = self._eps(zz, torch.cat([t, t]), cc, ctx2).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def _eps(self, z_t, t, concat, ctx) -> torch.Tensor:
        x = torch.cat([z_t.to(self.dtype), concat.to(self.dtype)], 1)
        out = self.unet(x, t.to(self.device), encoder_hidden_states=ctx).sample.float()
        if self.v_prediction:
            ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            out = ab.sqrt() * out + (1 - ab).sqrt() * z_t.float()
        return out

    def sds_loss(self, images: torch.Tensor, elevation: torch.Tensor, azimuth: torch.Tensor,
                 distance: torch.Tensor, guidance_scale: float = 3.0, t_range: tuple[float, float] = (0.02, 0.98),
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Score distillation on rendered novel views: a loss whose gradient w.r.t. the latents is w(t)(eps^ - eps)."""
        z = self.encode_images(images).float()
        T = self.num_train_timesteps
        lo, hi = int(t_range[0] * T), int(t_range[1] * T)
        t = torch.randint(lo, hi, (len(z),), generator=generator).to(self.device)
        noise = torch.randn(z.shape, generator=generator).to(z.device)
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        with torch.no_grad():
            eps = self.predict_noise(ab.sqrt() * z + (1 - ab).sqrt() * noise, t, elevation, azimuth, distance,
                                     guidance_scale)
        grad = (1 - ab) * (eps - noise)
        grad = torch.nan_to_num(grad)
        return 0.5 * F.mse_loss(z, (z - grad).detach(), reduction="sum") / len(z)

    @torch.no_grad()
    def sample(self, elevation: torch.Tensor, azimuth: torch.Tensor, distance: torch.Tensor, steps: int = 25,
               guidance_scale: float = 3.0, seed: int = 0) -> torch.Tensor:
        """DDIM samples (B, 3, H, W) in [0, 1] of the target views; view i depends only on (seed, i)."""
        B = len(torch.as_tensor(elevation).reshape(-1))
        z = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                         for i in range(B)]).to(self.device)
        ts = torch.linspace(self.num_train_timesteps - 1, 0, steps).round().long()
        for k, t in enumerate(ts):
            tt = t.repeat(B).to(self.device)
            eps = self.predict_noise(z, tt, elevation, azimuth, distance, guidance_scale)
            ab = self.alphas_cumprod[t]
            ab_prev = self.alphas_cumprod[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0, device=self.device)
            x0 = (z - (1 - ab).sqrt() * eps) / ab.sqrt()
            z = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        return self.decode_latents(z)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=images.shape[-1] > size)


def load_cc_projection(folder: Path) -> CCProjection:
    """``cc_projection/`` as written by the diffusers Zero-1-to-3 pipeline (config + safetensors)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    weights = sorted(folder.glob("*.safetensors"))
    state = load_file(str(weights[0]))
    state = {k if k.startswith("projection.") else f"projection.{k}": v for k, v in state.items()}
    w = state["projection.weight"]
    model = CCProjection(int(cfg.get("in_channel", w.shape[1])), int(cfg.get("out_channel", w.shape[0])))
    model.load_state_dict(state)
    return model


def resolve_views_source(id_or_dir: str) -> Path:
    """An alias, local folder or hub id -> a local folder (downloading the listed components if needed)."""
    name = ALIASES.get(id_or_dir, id_or_dir)
    path = Path(name).expanduser()
    if path.exists():
        return path
    if id_or_dir == "toy-views":
        raise PriorError("the toy view-conditioned prior has no weights in lods/priors/toy/weights/views; train "
                         "them with `python -m lods toy-prior train-views`")
    if not HUB_ID.match(name) or name.startswith("."):
        raise PriorError(f"no model folder at '{name}'; pass a Zero-1-to-3 diffusers folder or a hub id such as "
                         "kxic/zero123-xl")
    from huggingface_hub import snapshot_download

    allow = ["model_index.json", *(f"{c}/*" for c in COMPONENTS)]
    failure: Exception | None = None
    for cached_only in (True, False):
        try:
            return Path(snapshot_download(name, allow_patterns=allow, ignore_patterns=_HUB_IGNORE,
                                          local_files_only=cached_only))
        except (OSError, ValueError) as err:
            failure = err
    raise PriorError(f"cannot get '{name}' from the Hugging Face Hub ({one_line(failure, 120)}); run "
                     f"`huggingface-cli download {name}` where there is internet, or pass a local folder")


def check_views_folder(root: Path) -> None:
    """A one-line PriorError unless ``root`` has the Zero-1-to-3 diffusers layout with safetensors weights."""
    if not root.is_dir():
        raise PriorError(f"'{root}' is a file, not a diffusers model folder")
    needed = {"unet": "unet/config.json", "vae": "vae/config.json", "image_encoder": "image_encoder/config.json",
              "cc_projection": "cc_projection/config.json",
              "feature_extractor": "feature_extractor/preprocessor_config.json",
              "scheduler": "scheduler/scheduler_config.json"}
    missing = [f for f in needed.values() if not (root / f).exists()]
    if missing:
        raise PriorError(f"'{root}' is not a Zero-1-to-3 diffusers folder (missing {', '.join(missing)})")
    for comp in ("unet", "vae", "image_encoder", "cc_projection"):
        if not any(p.suffix == ".safetensors" for p in (root / comp).iterdir()):
            raise PriorError(f"'{root / comp}' has no .safetensors weights (only safetensors are loaded); re-save "
                             "the model with save_pretrained(..., safe_serialization=True)")

