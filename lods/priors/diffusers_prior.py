"""Any Stable-Diffusion-format diffusers model as a :class:`~lods.priors.base.DiffusionPrior`.

The folder (local, or a Hugging Face Hub id) is read component by component, the way
``StableDiffusionPipeline`` lays it out::

    unet/          UNet2DConditionModel          (required)
    vae/           AutoencoderKL                 (optional: without it the model is pixel-space)
    text_encoder/  a transformers text model     (required; its last hidden state is the condition)
    tokenizer/     anything AutoTokenizer reads  (required)
    scheduler/     a DDPM-compatible config      (required; only its noise schedule is used)

Only ``.safetensors`` weights are read and no remote code is ever run. Loading problems surface as a
one-line :class:`~lods.priors.base.PriorError` that says what is missing and how to get it.
"""

from __future__ import annotations

import functools
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lods.errors import one_line
from lods.priors.base import PriorDefaults, PriorError

SD21 = "stabilityai/stable-diffusion-2-1-base"
TOY_WEIGHTS = Path(__file__).resolve().parent / "toy" / "weights"
ALIASES: dict[str, str] = {"sd21": SD21, "toy": str(TOY_WEIGHTS)}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_HUB_ALLOW = ["model_index.json", *(f"{c}/*" for c in _COMPONENTS)]
_HUB_IGNORE = ["*.bin", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.pb", "*.fp16.*", "*non_ema*", "*.ema.*"]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def resolve_dtype(device: torch.device, dtype: torch.dtype | str | None) -> torch.dtype:
    """fp32 on CPU and fp16 on CUDA unless asked otherwise ("fp32", "fp16", "bf16" or a torch dtype)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise PriorError(f"unknown dtype '{dtype}'; use one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    return dtype


def resolve_source(id_or_dir: str) -> Path:
    """An alias, local folder or hub id -> a local folder holding the components (downloading if needed)."""
    name = ALIASES.get(id_or_dir, id_or_dir)
    path = Path(name).expanduser()
    if id_or_dir == "toy" and not (path / "unet" / "config.json").exists():
        raise PriorError("the toy prior has no weights in lods/priors/toy/weights; train them with "
                         "`python -m lods toy-prior train`")
    if path.exists():
        return path
    if not HUB_ID.match(name) or name.startswith("."):
        raise PriorError(f"no model folder at '{name}'; pass an existing diffusers folder or a hub id such as {SD21}")
    from huggingface_hub import snapshot_download

    failure: Exception | None = None
    for cached_only in (True, False):
        try:
            return Path(snapshot_download(
                name, allow_patterns=_HUB_ALLOW, ignore_patterns=_HUB_IGNORE, local_files_only=cached_only
            ))
        except (OSError, ValueError) as err:
            failure = err
    raise PriorError(
        f"cannot get '{name}' from the Hugging Face Hub ({one_line(failure, 120)}); run "
        f"`huggingface-cli download {name}` where there is internet, or pass a local folder"
    ) from failure


def local_folder(id_or_dir: str) -> Path | None:
    """The local folder of an alias or a path, without downloading anything; None for a hub id."""
    path = Path(ALIASES.get(id_or_dir, id_or_dir)).expanduser()
    return path if path.is_dir() else None


def prior_defaults(id_or_dir: str) -> PriorDefaults:
    """What a prior declares about runs (its ``lods_prior.json``) without loading it; generic for hub ids."""
    folder = local_folder(id_or_dir)
    return PriorDefaults.read(folder) if folder is not None else PriorDefaults()


def judge_path(id_or_dir: str) -> Path | None:
    """The judge classifier a prior ships for its own world (the toy prior's ``judge.safetensors``), if any."""
    folder = local_folder(id_or_dir)
    path = folder / "judge.safetensors" if folder is not None else None
    return path if path is not None and path.is_file() else None


def check_folder(root: Path) -> None:
    """Raise a one-line PriorError unless ``root`` looks like a Stable-Diffusion-format diffusers folder."""
    if not root.is_dir():
        raise PriorError(f"'{root}' is a file, not a diffusers model folder")
    required = {
        "unet": "unet/config.json",
        "text_encoder": "text_encoder/config.json",
        "tokenizer": "tokenizer/",
        "scheduler": "scheduler/scheduler_config.json",
    }
    missing = [f for f in required.values() if not (root / f).exists()]
    if missing:
        raise PriorError(
            f"'{root}' is not a Stable-Diffusion-format diffusers folder (missing {', '.join(missing)}); "
            f"pass a folder written by save_pretrained or a hub id such as {SD21}"
        )
    weighted = ["unet", "text_encoder"] + (["vae"] if (root / "vae" / "config.json").exists() else [])
    for comp in weighted:
        if not any(p.suffix == ".safetensors" for p in (root / comp).iterdir()):
            raise PriorError(
                f"'{root / comp}' has no .safetensors weights (only safetensors are loaded); "
                "re-save the model with save_pretrained(..., safe_serialization=True)"
            )


def load_part(root: Path | str, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` (a ``from_pretrained`` of one part of a model folder), or a one-line ``PriorError`` naming it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per component load is noise (downloads keep their own bars)
    try:
        return fn()
    except Exception as err:
        raise PriorError(f"cannot load {what} from '{root}': {one_line(err, 200)}") from err


def load_diffusers_model(root: Path, cls: type, subfolder: str, torch_dtype: torch.dtype) -> Any:
    """The diffusers model (UNet, VAE) in ``root/subfolder``, safetensors only, through :func:`load_part`."""
    return load_part(root, f"{subfolder}/", lambda: cls.from_pretrained(
        root, subfolder=subfolder, use_safetensors=True, torch_dtype=torch_dtype))


class DiffusersPrior:
    """A diffusers UNet (+ optional VAE) and a text encoder, seen as an epsilon-prediction oracle.

    ``predict_noise`` always returns epsilon: v-prediction models are converted with
    eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) z_t. LoRA adapters (peft) live on the UNet and are off
    outside :meth:`lora_scale`; a camera-conditioned adapter adds ``MLP(flattened c2w)`` to the UNet's
    timestep embedding while it is active (the ProlificDreamer-style class embedding, zero-initialised so
    that a fresh adapter reproduces the base model).
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module | None,
        text_encoder: nn.Module,
        tokenizer,
        scheduler,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        negative_prompt: str = "",
        defaults: PriorDefaults | None = None,
    ):
        self.device = torch.device(device)
        self.defaults = defaults or PriorDefaults()
        self.dtype = resolve_dtype(self.device, dtype)
        self.negative_prompt = negative_prompt
        cfg = unet.config
        if getattr(cfg, "addition_embed_type", None) is not None:
            raise PriorError("SDXL-style UNets (added conditioning) are not supported; use Stable Diffusion 1.x or 2.x")
        hidden = getattr(text_encoder.config, "hidden_size", None)
        if hidden is not None and hidden != cfg.cross_attention_dim:
            raise PriorError(f"text encoder width {hidden} != the UNet's cross_attention_dim {cfg.cross_attention_dim}")
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise PriorError(f"prediction_type '{prediction}' is not supported (epsilon or v_prediction)")
        self.v_prediction = prediction == "v_prediction"

        for module in (unet, vae, text_encoder):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
                if next(module.parameters()).dtype != self.dtype:
                    module.to(dtype=self.dtype)
                module.to(self.device)
        if self.device.type == "cuda":
            unet.to(memory_format=torch.channels_last)
            _enable_xformers(unet)
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self._alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)

        sample = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.scaling_factor = float(vae.config.scaling_factor) if vae is not None else 1.0
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0) if vae is not None else 0.0
        self.image_size = int(sample) * self.vae_scale_factor
        self.latent_shape = (int(cfg.in_channels), int(sample), int(sample))

        self._text_cache: dict[str, torch.Tensor] = {}
        self._lora_names: list[str] = []
        self._adapter: tuple[str, float] | None = None
        self.camera_embeddings = nn.ModuleDict()
        self._call = threading.local()  # per calling thread: the camera labels of the UNet call under way
        self._camera_hook = None
        self.unet_call = UNetCall(self)  # every UNet forward goes through it (``bench speed`` hooks it)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        id_or_dir: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        negative_prompt: str = "",
    ) -> DiffusersPrior:
        """Load "sd21", "toy", a hub id or a local Stable-Diffusion-format folder (see the module docstring)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoModel, AutoTokenizer

        root = resolve_source(id_or_dir)
        check_folder(root)
        torch_dtype = resolve_dtype(torch.device(device), dtype)

        load = functools.partial(load_part, root)

        unet = load_diffusers_model(root, UNet2DConditionModel, "unet", torch_dtype)
        vae = None
        if (root / "vae" / "config.json").exists():
            vae = load_diffusers_model(root, AutoencoderKL, "vae", torch_dtype)
        text_encoder = load("text_encoder/", lambda: AutoModel.from_pretrained(
            root / "text_encoder", use_safetensors=True, trust_remote_code=False, dtype=torch_dtype))
        tokenizer = load("tokenizer/", lambda: AutoTokenizer.from_pretrained(
            root / "tokenizer", trust_remote_code=False))
        scheduler = load("scheduler/", lambda: DDPMScheduler.from_pretrained(root, subfolder="scheduler"))
        return cls(unet, vae, text_encoder, tokenizer, scheduler, device, torch_dtype, negative_prompt,
                   defaults=PriorDefaults.read(root))

    # ------------------------------------------------------------------ schedule
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def add_noise(self, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(alpha_bar_t) z + sqrt(1 - alpha_bar_t) noise (the forward process)."""
        ab = self._alphas_cumprod[t.to(self.device).long()].view(-1, *([1] * (z.dim() - 1)))
        return (ab.sqrt() * z.float() + (1 - ab).sqrt() * noise.float()).to(z.dtype)

    # ------------------------------------------------------------------ text
    def _max_length(self) -> int:
        n = getattr(self.tokenizer, "model_max_length", None)
        if n is None or n > 100_000:
            n = self.text_encoder.config.max_position_embeddings
        return int(n)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Last hidden state of the text encoder for prompts padded to max length, as Stable Diffusion does."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if todo:
            if self.tokenizer.pad_token is None:
                raise PriorError("the tokenizer has no pad token; Stable-Diffusion-style padding needs one")
            tokens = self.tokenizer(
                todo, padding="max_length", max_length=self._max_length(), truncation=True, return_tensors="pt"
            )
            kwargs = {}
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                kwargs["attention_mask"] = tokens.attention_mask.to(self.device)
            hidden = self.text_encoder(tokens.input_ids.to(self.device), **kwargs)[0].to(self.dtype)
            for p, h in zip(todo, hidden):
                self._text_cache[p] = h[None]
        return torch.cat([self._text_cache[p] for p in prompts])

    # ------------------------------------------------------------------ images
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> z (a sample of the VAE's posterior, or its mean where the prior declares
        ``vae_latents: mean``; shifted and scaled; [-1, 1] pixels without a VAE). The sample draws from torch's
        global generator, which the trainer seeds and checkpoints."""
        x = images.to(self.device, self.dtype) * 2 - 1
        if self.vae is None:
            return x
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean if self.defaults.vae_latents == "mean" else posterior.sample()
        return (z - self.shift_factor) * self.scaling_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """z -> images in [0, 1]."""
        z = z.to(self.device, self.dtype)
        x = z if self.vae is None else self.vae.decode(z / self.scaling_factor + self.shift_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ UNet
    def predict_noise(
        self, z_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """epsilon(z_t; y, t) in float32, one UNet call; ``class_labels`` (B, 16) feed a camera-conditioned adapter."""
        t = t.to(self.device).long().expand(z_t.shape[0]) if t.dim() == 0 else t.to(self.device).long()
        self._call.class_labels = class_labels
        try:
            out = self.unet_call(z_t.to(self.dtype), t, text_emb.to(self.dtype), class_labels).float()
        finally:
            self._call.class_labels = None
        if self.v_prediction:
            ab = self._alphas_cumprod[t].view(-1, 1, 1, 1)
            out = ab.sqrt() * out + (1 - ab).sqrt() * z_t.float()
        return out

    # ------------------------------------------------------------------ LoRA
    def add_lora(
        self, name: str, rank: int = 4, alpha: float | None = None, camera_conditioning: bool = False
    ) -> list[nn.Parameter]:
        """Attach a peft LoRA adapter ``name`` on to_q/to_k/to_v/to_out.0; returns its trainable parameters (fp32).

        With ``camera_conditioning`` a small MLP maps the flattened 4x4 camera-to-world matrix to the
        timestep-embedding width; its output is added to the timestep embedding while the adapter is active.
        peft switches ``requires_grad`` of the LoRA weights on while the adapter is active and off otherwise.
        """
        from peft import LoraConfig

        if name in self._lora_names:
            raise ValueError(f"a LoRA adapter named '{name}' already exists")
        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=LORA_TARGETS)
        self.unet.add_adapter(config, adapter_name=name)
        self._lora_names.append(name)
        params = [p for n, p in self.unet.named_parameters() if "lora_" in n and f".{name}." in n]
        for p in params:
            p.data = p.data.float()
        if camera_conditioning:
            width = self.unet.time_embedding.linear_2.out_features
            mlp = nn.Sequential(nn.Linear(16, width), nn.SiLU(), nn.Linear(width, width)).to(self.device)
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)
            self.camera_embeddings[name] = mlp
            params += list(mlp.parameters())
            if self._camera_hook is None:
                self._camera_hook = self.unet.time_embedding.register_forward_hook(self._add_camera_embedding)
        self.unet.disable_adapters()
        self._adapter = None
        return params

    def remove_lora(self, name: str) -> None:
        """Delete adapter ``name`` (and its camera embedding) from the UNet."""
        if name not in self._lora_names:
            raise ValueError(f"no LoRA adapter named '{name}'")
        if self._adapter is not None and self._adapter[0] == name:
            self._set_adapter(None)
        self.unet.delete_adapters(name)
        self._lora_names.remove(name)
        if name in self.camera_embeddings:
            del self.camera_embeddings[name]

    def _add_camera_embedding(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        labels = getattr(self._call, "class_labels", None)
        if labels is None or self._adapter is None or self._adapter[0] not in self.camera_embeddings:
            return output
        name, scale = self._adapter
        cam = self.camera_embeddings[name](labels.to(self.device, torch.float32).reshape(-1, 16))
        return output + (scale * cam).to(output.dtype)

    def _set_adapter(self, state: tuple[str, float] | None) -> None:
        if state == self._adapter:
            return
        if state is None:
            self.unet.disable_adapters()
        else:
            self.unet.enable_adapters()
            self.unet.set_adapters([state[0]], weights=[state[1]])
        self._adapter = state

    @contextmanager
    def lora_scale(self, name: str | None, scale: float = 1.0) -> Iterator[None]:
        """Run the UNet with adapter ``name`` at ``scale`` inside the block (None or 0: the base model exactly)."""
        if name is not None and name not in self._lora_names:
            raise ValueError(f"no LoRA adapter named '{name}'")
        previous = self._adapter
        self._set_adapter(None if name is None or scale == 0 else (name, float(scale)))
        try:
            yield
        finally:
            self._set_adapter(previous)


def _quiet_tracing() -> None:
    """Silence what tracing the UNet says every time: diffusers' shape checks becoming constants (hence one
    graph per latent size) and torch.jit.trace's deprecation notice. Process-wide filters for these
    warnings only, set before each trace (``warnings.catch_warnings`` is not safe in the tracing thread;
    setting one again replaces it)."""
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace(_method)?` is deprecated",
                            category=DeprecationWarning)


class UNetCall(nn.Module):
    """The one way a :class:`DiffusersPrior` calls its UNet: ``(z_t, t, emb) -> the UNet's output``.

    On the CPU in float32 with no adapter attached (no LoRA, no camera embedding), the UNet runs as a
    graph traced at the first call of each latent size and text length (``torch.jit.trace`` of a
    function calling the UNet: 0.2 s for the toy UNet) and executed without the JIT's graph
    optimisations: the same aten ops in the same order as the eager module, so the results and their
    gradients are bit-identical (tested), with the Python of diffusers' module tree gone from every
    call. The graph reads the UNet's own parameters (no copy: tested) and releases the GIL for the
    whole forward, so the learned update's UNet pass in the trainer's second thread runs beside the
    guidance's. Everywhere else (CUDA, half precision, adapters, ``trace = False``) the eager module
    runs; so does a UNet that cannot be traced.
    """

    def __init__(self, prior: DiffusersPrior) -> None:
        super().__init__()
        self.prior = prior
        self.trace = prior.device.type == "cpu"
        self._graphs: dict[tuple, Any] = {}  # (id of the UNet, latent size, text shape) -> traced graph
        self._untraceable: set[int] = set()
        self._lock = threading.Lock()

    def _graph(self, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, class_labels) -> Any:
        """The traced graph for this call (traced now if it is the first of its size), or None where the eager
        module runs it."""
        prior, unet = self.prior, self.prior.unet
        if (not self.trace or class_labels is not None or prior.device.type != "cpu" or z_t.dtype != torch.float32
                or prior._lora_names or prior._camera_hook is not None or id(unet) in self._untraceable
                or not isinstance(unet, nn.Module)):
            return None
        key = (id(unet), tuple(z_t.shape[2:]), tuple(emb.shape[1:]))
        graph = self._graphs.get(key)
        if graph is None:
            with self._lock:  # the guidance and the learned update may ask at once
                graph = self._graphs.get(key)
                if graph is None and id(unet) not in self._untraceable:
                    graph = self._trace(unet, (z_t[:1].detach(), t[:1].detach(), emb[:1].detach()))
                    if graph is None:
                        self._untraceable.add(id(unet))
                    else:
                        self._graphs[key] = graph
        return graph

    @staticmethod
    def _trace(unet: nn.Module, example: tuple) -> Any:
        _quiet_tracing()

        def unet_fn(z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            return unet(z_t, t, encoder_hidden_states=emb, return_dict=False)[0]

        try:
            # A function, not the module: the parameters enter the graph as constants sharing their storage, and
            # the trace takes a quarter of the time (0.2 s against 0.9 s: no script module per submodule)
            with torch.no_grad(), torch.jit.optimized_execution(False):
                return torch.jit.trace(unet_fn, example, check_trace=False)
        except Exception as err:  # noqa: BLE001 - any failure to trace leaves the eager module in charge
            warnings.warn(f"the UNet runs eagerly: tracing it failed ({one_line(err, 200)})", stacklevel=2)
            return None

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, class_labels=None) -> torch.Tensor:
        graph = self._graph(z_t, t, emb, class_labels)
        if graph is None:
            return self.prior.unet(z_t, t, encoder_hidden_states=emb).sample
        with torch.jit.optimized_execution(False):  # the recorded ops as they are (a thread-local switch)
            return graph(z_t, t, emb)


def _enable_xformers(unet: nn.Module) -> None:
    """Use xformers attention where it is installed and works; PyTorch's SDPA (the diffusers default) otherwise."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        return
    try:
        unet.enable_xformers_memory_efficient_attention()
    except (ImportError, RuntimeError, ValueError, NotImplementedError) as err:
        warnings.warn(f"xformers attention unavailable ({one_line(err, 200)}); using PyTorch SDPA", stacklevel=2)
