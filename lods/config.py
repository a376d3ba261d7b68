"""Run settings with one typed owner: :class:`RunConfig` (what a run starts with) and :class:`Knobs` (what may
change while it trains).

Every check lives here once. ``RunConfig.from_dict`` reads plain values (YAML, ``--set``, the page) and names
the dotted key of any unknown key or wrongly typed value (``gaussians.num_points must be a whole number``);
``RunConfig.validate`` checks ranges and combinations; ``Knobs.replace`` is the only way a live knob changes
and applies the same rules (the CFG weight's range, which methods take an infinite weight). The page, the CLI
and YAML files use the same field names: ``cfg``, ``lr_scale``, ``learned_lr``, ``steps``, ...

Settings whose best value depends on the prior (the learned-parameter rate, view-dependent prompts, the
Gaussian cap, CPU threads) are ``None`` here and come from the prior's own :class:`~lods.priors.base.PriorDefaults`
when the run starts; ``config.yaml`` records the resolved values.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lods.cameras import CameraRange
from lods.errors import UserError
from lods.guidance import METHODS, GuidanceConfig
from lods.scenes import SCENES
from lods.scenes.gaussians import GaussianConfig
from lods.scenes.image import ImageConfig
from lods.scenes.nerf import NerfConfig


@dataclass
class Image3DConfig:
    """Image-to-3D (section 4.2, after Magic123): the input view's losses and the two priors' weights.

    The loss is ``rgb_weight`` MSE(render, input) + ``mask_weight`` MSE(alpha, mask) at the input camera, plus
    ``text_weight`` times the text prior's estimator loss and ``view_weight`` times the view-conditioned prior's
    SDS on the step's novel views (text 1, view 40 and the view prior's guidance scale 5 as Magic123's release;
    RGB 5 and mask 0.5 keep the 10 : 1 of threestudio's magic123 config at a scale set for 64-pixel renders). The
    normalized estimators (LODS, SDS-norm) give Eq. 3 divided by the CFG weight; ``text_times_cfg`` multiplies
    their loss back by a finite weight, so that ``text_weight`` means the same under every estimator.
    ``view_method``: "sds" (Magic123, the paper) or "lods-embed" (a learned null context token on the view
    prior, section 4.5's suggestion; not tried in the paper). The input camera (degrees, world units) is the
    reference view; None: the input's sidecar JSON when it has one, else elevation 20, azimuth 0, distance
    2.85, fovy 42.5.
    """

    input_image: str = ""  # the input view's path: set, the run is image-to-3D (``generate --image``, the app)
    view_prior: str = "toy-views"
    rgb_weight: float = 5.0
    mask_weight: float = 0.5
    text_weight: float = 1.0
    view_weight: float = 40.0
    view_cfg: float = 5.0
    view_method: str = "sds"
    view_lr: float = 1e-3
    text_times_cfg: bool = True
    ref_elevation: float | None = None
    ref_azimuth: float | None = None
    ref_distance: float | None = None
    ref_fovy: float | None = None

    def __post_init__(self) -> None:
        for name in ("rgb_weight", "mask_weight", "text_weight", "view_weight", "view_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, not {value}")
        if not (math.isfinite(self.view_cfg) and self.view_cfg >= 1):
            raise ValueError(f"view_cfg must be a finite number >= 1, not {self.view_cfg}")
        if self.view_method not in ("sds", "lods-embed"):
            raise ValueError(f"view_method must be sds or lods-embed, not {self.view_method!r}")


# The knobs a running run accepts; the same names everywhere. The two priors' weights turn in image-to-3D runs only.
LIVE_KNOBS = ("cfg", "lr_scale", "learned_lr", "text_weight", "view_weight")
KNOB_LABELS = {"cfg": "CFG weight", "lr_scale": "scene learning-rate scale",
               "learned_lr": "learned-parameter learning rate", "text_weight": "text prior's weight",
               "view_weight": "view prior's weight"}
WEIGHT_KNOBS = ("text_weight", "view_weight")  # in the ``image3d`` section of a RunConfig
MAX_PRIOR_WEIGHT = 1e4
DEVICE_RE = re.compile(r"(cpu|cuda)(:\d+)?")
MAX_PROMPT = 1000
_RANGES = (  # (field, lowest, highest) of the integer settings
    ("steps", 1, 10_000_000),
    ("seed", 0, 2**32 - 1),
    ("batch", 1, 64),
    ("threads", 1, 1024),
    ("resolution", 16, 4096),
    ("log_every", 1, 10**9),
    ("snapshot_every", 1, 10**9),  # more than the steps: only at the end
    ("checkpoint_every", 0, 10**9),
    ("preview_views", 1, 16),
)
BACKBONES = tuple(SCENES)  # gs, nerf, image
SECTIONS: dict[str, type] = {"guidance": GuidanceConfig, "gaussians": GaussianConfig, "nerf": NerfConfig,
                             "image": ImageConfig, "camera": CameraRange, "image3d": Image3DConfig}
# Settings that shape a checkpoint's state: a resumed run must keep them.
FIXED_ON_RESUME = ("prompt", "negative_prompt", "source_prompt", "prior", "backbone", "method", "seed", "batch",
                   "resolution", "background", "preview_views", "guidance", "gaussians", "nerf", "image", "camera",
                   "image3d")


@dataclass
class RunConfig:
    """Everything a run needs; the same keys in YAML, on the command line and in the app."""

    prompt: str = "a red cube"
    negative_prompt: str = ""
    source_prompt: str | None = None  # editing: the caption of the input image
    prior: str = "toy"
    backbone: str = "gs"
    method: str = "lods-embed"
    cfg: float = 100.0  # the CFG weight w of Eq. 2 (a live knob; inf where the method allows it)
    steps: int = 600
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    threads: int | None = None  # CPU threads for torch; None: the prior's choice (1 for the toy prior)
    # A second CPU thread for the learned update (Algorithm 1, line 6) where the estimator allows it (LODS-embed):
    # it runs beside the scene's backward and the next step's render; the same numbers either way.
    # None: on the CPU, not on a GPU.
    second_thread: bool | None = None
    batch: int = 4  # views per step
    resolution: int | None = None  # render size; None: the prior's native size
    lr: dict[str, float] = field(default_factory=dict)  # scene learning rates by group name (empty: defaults)
    lr_scale: float = 1.0  # multiplies every scene learning rate (a live knob)
    learned_lr: float | None = None  # alpha / LoRA rate (a live knob); None: the prior's rate for the method
    view_prompts: bool | None = None  # append "front view" etc.; None: the prior's choice
    background: str = "white"  # behind the renders while training: white, random, or scene (the scene's own)
    log_every: int = 1
    snapshot_every: int = 10
    checkpoint_every: int = 200
    preview_views: int = 4
    max_grad_norm_jump: float = 1e4  # divergence guard: stop when the scene's grad norm exceeds this x its median
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    gaussians: GaussianConfig = field(default_factory=GaussianConfig)
    nerf: NerfConfig = field(default_factory=NerfConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    camera: CameraRange = field(default_factory=CameraRange)
    image3d: Image3DConfig = field(default_factory=Image3DConfig)  # used by image-to-3D runs only

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if value is None:
                value = {}
            if not isinstance(value, cls):
                setattr(self, name, section_from_dict(cls, value, prefix=f"{name}."))

    @classmethod
    def from_dict(cls, d: Any) -> RunConfig:
        """From plain values (YAML, ``--set``); a ``UserError`` naming the dotted key of any unknown key or
        any value of the wrong type, including inside the scene, guidance and camera sections."""
        if not isinstance(d, dict):
            raise UserError(f"a config must be a mapping of keys to values, not {type(d).__name__}")
        check_fields(cls, {k: v for k, v in d.items() if k not in SECTIONS})
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples) for YAML and JSON; ``from_dict`` reads them back."""
        return _plain(asdict(self))

    def validate(self) -> None:
        """A one-line ``UserError`` for anything a run cannot start with."""
        import torch

        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise UserError("the prompt is empty")
        if len(self.prompt) > MAX_PROMPT:
            raise UserError(f"the prompt is longer than {MAX_PROMPT} characters")
        if self.backbone not in BACKBONES:
            raise UserError(f"unknown backbone {self.backbone!r}; choose one of: {', '.join(BACKBONES)}")
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        check_cfg(self.cfg, self.method)
        if not DEVICE_RE.fullmatch(self.device or "cpu"):
            raise UserError(f"unknown device {self.device!r}; use cpu or cuda (cuda:N for one of several GPUs)")
        if (self.device or "").startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {self.device} was asked for but CUDA is not available; use --device cpu")
        for name, low, high in _RANGES:
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise UserError(f"{name} must be between {low:,} and {high:,}, not {value}")
        if self.resolution is not None and self.resolution % 8:
            raise UserError(f"resolution must be a multiple of 8, not {self.resolution}")
        if self.background not in ("white", "random", "scene"):
            raise UserError(f"background must be white, random or scene (the scene's own), not {self.background!r}")
        if not self.max_grad_norm_jump > 1:
            raise UserError(f"max_grad_norm_jump must be a number above 1, not {self.max_grad_norm_jump}")
        for name, value in self.lr.items():
            check_lr(value, f"learning rate of {name}")
        check_lr(self.lr_scale, KNOB_LABELS["lr_scale"])
        if self.learned_lr is not None:
            check_lr(self.learned_lr, KNOB_LABELS["learned_lr"])
        if METHODS[self.method].edit_only and self.source_prompt is None:
            raise UserError(f"{self.method} is an editing method: use `python -m lods edit`")
        if self.source_prompt is not None and self.backbone != "image":
            raise UserError("editing works on images: use --backbone image")


@dataclass(frozen=True)
class Knobs:
    """What may change while a run trains; read once per step. Frozen: a change is a new object made by
    :meth:`replace`, which validates it."""

    cfg: float
    lr_scale: float = 1.0  # multiplies every scene learning rate
    learned_lr: float | None = None  # the alpha / LoRA rate; None: the estimator's own
    text_weight: float | None = None  # image-to-3D: the text prior's weight (None in text-to-3D runs)
    view_weight: float | None = None  # image-to-3D: the view-conditioned prior's weight
    paused: bool = False
    stop: bool = False

    @classmethod
    def of(cls, config: RunConfig) -> Knobs:
        return cls(**{name: config_knob(config, name) for name in LIVE_KNOBS})

    def replace(self, method: str | None, **changes: Any) -> Knobs:
        """A copy with ``changes``, each checked for ``method`` (one-line ``UserError`` otherwise; with ``method``
        None the rules that depend on the method are left out)."""
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            if name == "cfg":
                checked[name] = check_cfg(value, method)
            elif name in ("lr_scale", "learned_lr"):
                checked[name] = None if value is None and name == "learned_lr" else check_lr(value, KNOB_LABELS[name])
            elif name in WEIGHT_KNOBS:
                if self.text_weight is None:
                    raise UserError(f"the {KNOB_LABELS[name]} turns in image-to-3D runs only")
                checked[name] = check_weight(value, KNOB_LABELS[name])
            elif name in ("paused", "stop"):
                checked[name] = bool(value)
            else:
                raise UserError(f"unknown knob {name!r}; the live knobs are {', '.join(LIVE_KNOBS)}")
        return dataclasses.replace(self, **checked)


def check_cfg(value: Any, method: str | None = None) -> float:
    """A CFG weight: a number >= 1; inf only for a method that takes the infinite limit."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 1:
        raise UserError(f"the CFG weight must be a number >= 1 (inf allowed), not {value}")
    if math.isinf(value) and method is not None and METHODS[method].finite_cfg_only:
        takes = ", ".join(m for m, cls in METHODS.items() if not cls.finite_cfg_only)
        raise UserError(f"{method} diverges at an infinite CFG weight; use a finite one, or one of {takes}")
    return float(value)


def config_knob(config: RunConfig, name: str) -> Any:
    """The value ``config`` gives the live knob ``name`` (the priors' weights: None unless the run is image-to-3D)."""
    if name in WEIGHT_KNOBS:
        return getattr(config.image3d, name) if config.image3d.input_image else None
    return getattr(config, name)


def with_knobs(config: RunConfig, knobs: Knobs) -> RunConfig:
    """``config`` with the live knobs' values (the priors' weights into its ``image3d`` section)."""
    top = {name: getattr(knobs, name) for name in LIVE_KNOBS if name not in WEIGHT_KNOBS}
    weights = {name: getattr(knobs, name) for name in WEIGHT_KNOBS if getattr(knobs, name) is not None}
    return dataclasses.replace(config, **top, image3d=dataclasses.replace(config.image3d, **weights))


def check_weight(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= MAX_PRIOR_WEIGHT:
        raise UserError(f"the {what} must be a number between 0 and {MAX_PRIOR_WEIGHT:g}, not {value}")
    return float(value)


def check_lr(value: Any, what: str = "learning rate") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or value > 10:
        raise UserError(f"the {what} must be a finite number between 0 and 10, not {value}")
    return float(value)


def cfg_label(cfg: float) -> str:
    """"CFG 100", "CFG 7.5", "CFG ∞": the one way a weight is written on the page, in tables and in folders."""
    return "CFG ∞" if math.isinf(cfg) else f"CFG {cfg:g}"


def check_resumable(saved: RunConfig, new: RunConfig) -> None:
    """A one-line ``UserError`` when ``new`` changes a setting the checkpoint of ``saved`` depends on."""
    for name in FIXED_ON_RESUME:
        before, after = getattr(saved, name), getattr(new, name)
        if name == "resolution" and (before is None or after is None):
            continue
        if before != after:
            if dataclasses.is_dataclass(before):
                before, after = _changed(before, after)
            raise UserError(f"{name} cannot change when resuming (the checkpoint has {before!r}, asked {after!r}); "
                            "start a new run in another folder")


def _changed(a: Any, b: Any) -> tuple[dict, dict]:
    da, db = asdict(a), asdict(b)
    keys = [k for k in da if da[k] != db.get(k)]
    return {k: da[k] for k in keys}, {k: db[k] for k in keys}


# ------------------------------------------------------------------ typed plain values


def section_from_dict(cls: type, d: Any, prefix: str = "") -> Any:
    """Dataclass ``cls`` from plain values, nested dataclasses and tuples included, checked by ``check_fields``."""
    check_fields(cls, d, prefix)
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in d.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = section_from_dict(hint, value, prefix=f"{prefix}{key}.")
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        values[key] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise UserError(f"{prefix.rstrip('.')}: {err}") from err


def check_fields(cls: type, d: Any, prefix: str = "") -> None:
    """A ``UserError`` for keys of ``d`` that are not fields of dataclass ``cls`` or values of the wrong type."""
    if not isinstance(d, dict):
        raise UserError(f"{prefix.rstrip('.') or 'the config'} must be a mapping of keys to values, not {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key, value in d.items():
        if key not in names:
            raise UserError(f"unknown config key {prefix}{key}; known keys here: {', '.join(sorted(names))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                check_fields(hint, value, prefix=f"{prefix}{key}.")
        elif not _fits(value, hint):
            raise UserError(f"{prefix}{key} must be {_describe(hint)}, not {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if origin is tuple:
        return (isinstance(value, (list, tuple)) and len(value) == len(args)
                and all(_fits(v, a) for v, a in zip(value, args)))
    return True  # a type this checker does not know: the section's own constructor checks it


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    return {int: "a whole number", float: "a number", str: "text", bool: "true or false", type(None): "empty (null)"
            }.get(hint, getattr(hint, "__name__", str(hint)))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
