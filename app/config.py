"""From what a person typed to a validated :class:`~lods.trainer.RunConfig`.

Two rules live here and nowhere else:

* which diffusion priors a page may load (:class:`ModelPolicy`): on localhost any Hugging Face hub id,
  on a public server or a Hugging Face Space only an allow-list; a filesystem path typed into the
  page is never accepted (local folders are passed on the command line with ``--allow-model``);
* which numbers a run or a live knob accepts: the library's own checks (``check_cfg``, ``check_lr``,
  ``RunConfig.validate``) plus the page's limits, each failing with a one-line ``UserError``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lods.config import BACKBONES, KNOB_LABELS, LIVE_KNOBS, RunConfig, check_cfg, check_weight
from lods.errors import UserError
from lods.guidance import METHODS
from lods.priors.diffusers_prior import HUB_ID, prior_defaults
from lods.runs import PRESETS

BUILTIN_PRIORS = ("toy", "sd21")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
APP_METHODS = tuple(m for m, cls in METHODS.items() if not cls.edit_only)  # editing: `python -m lods edit`
CFG_MAX = 10000.0  # the paper uses 1000 in 3D; larger values show the VSD-like limit (floaters)
MAX_TEXT = 1000
MAX_SEED = 2**31 - 1


def restricted_server(host: str, env: Mapping[str, str] = os.environ) -> bool:
    """True when strangers can reach the page: bound beyond loopback, or running on a Hugging Face Space."""
    return bool(env.get("SPACE_ID")) or host not in LOOPBACK_HOSTS


@dataclass(frozen=True)
class ModelPolicy:
    """The priors a page offers (``allowed``) and whether free-text hub ids are accepted (``custom_ids``)."""

    allowed: tuple[str, ...] = BUILTIN_PRIORS
    custom_ids: bool = False

    @classmethod
    def for_server(cls, host: str, extra: tuple[str, ...] | list[str] = (), env: Mapping[str, str] = os.environ
                   ) -> ModelPolicy:
        """Built-ins plus the operator's ``--allow-model`` ids; free-text ids only on a loopback, non-Space server."""
        allowed = tuple(dict.fromkeys([*BUILTIN_PRIORS, *extra]))
        return cls(allowed=allowed, custom_ids=not restricted_server(host, env))

    def resolve(self, choice: Any, custom: Any = "") -> str:
        """The prior name a run may load, from the dropdown ``choice`` or the free-text ``custom`` id."""
        custom = custom.strip() if isinstance(custom, str) else ""
        if custom:
            if not self.custom_ids:
                raise UserError(f"this server only loads the listed models: {', '.join(self.allowed)}")
            if not HUB_ID.match(custom) or ".." in custom or Path(custom).exists():
                raise UserError(
                    f"'{_clip(custom)}' is not a Hugging Face model id such as stabilityai/stable-diffusion-2-1-base; "
                    "local folders are passed on the command line with --allow-model"
                )
            return custom
        if choice not in self.allowed:
            raise UserError(f"unknown model '{_clip(str(choice))}'; choose one of: {', '.join(self.allowed)}")
        return choice


def _clip(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or value is None or value == "":
        raise UserError(f"the {what} must be a number")
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise UserError(f"the {what} must be a number, not {_clip(str(value))!r}") from err


def _integer(value: Any, what: str, low: int, high: int) -> int:
    number = _number(value, what)
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise UserError(f"the {what} must be a whole number between {low:,} and {high:,}")
    return int(number)


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"the {what} must be text")
    if len(value) > MAX_TEXT:
        raise UserError(f"the {what} is longer than {MAX_TEXT} characters")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in value):
        raise UserError(f"the {what} contains control characters")
    return " ".join(value.split())


INF_WORDS = ("inf", "∞", "infinity")


def page_knob(name: Any, value: Any) -> float:
    """A number typed or dragged on the page for the live knob ``name``, with the page's one extra limit (a finite
    CFG weight of at most ``CFG_MAX``; "inf" or "∞" is the infinite limit, which ``check_cfg`` allows only for the
    methods that take it); ``Knobs.replace`` checks the rest."""
    if name not in LIVE_KNOBS:
        raise UserError(f"unknown knob {name!r}; the live knobs are {', '.join(LIVE_KNOBS)}")
    if name == "cfg" and isinstance(value, str) and value.strip().lower() in INF_WORDS:
        return math.inf
    number = _number(value.strip() if isinstance(value, str) else value, KNOB_LABELS[name])
    if name == "cfg" and math.isfinite(number) and number > CFG_MAX:
        raise UserError(f"the CFG weight must be between 1 and {CFG_MAX:g} (or inf), not {value}")
    return number


def cfg_text(value: float) -> str:
    """How the CFG box writes a weight: ``100``, ``7.5``, ``inf``."""
    return "inf" if math.isinf(value) else f"{value:g}"


def round_weight(log10_w: float) -> float:
    """The weight at ``log10_w`` on the log-scale slider, rounded to two significant digits (7.5, 30, 1000)."""
    return min(CFG_MAX, max(1.0, float(f"{10 ** float(log10_w):.2g}")))


def checked_cfg(value: Any, method: str | None = None) -> float:
    """A CFG weight the page accepts for ``method``."""
    return check_cfg(page_knob("cfg", value), method)


def default_learned_lr(method: str, prior: str) -> float:
    """The learned-parameter rate a run of ``method`` starts with on ``prior`` (the prior's own declaration)."""
    return prior_defaults(prior).learned_rate(method) or 0.0


def learns_parameters(method: str) -> bool:
    """Whether ``method`` trains parameters of its own (alpha or a LoRA) with a learning rate."""
    return method in METHODS and METHODS[method].learns is not None


def build_run_config(
    *, prompt: Any, negative_prompt: Any, prior: str, backbone: Any, method: Any, cfg: Any, lr_scale: Any,
    learned_lr: Any, steps: Any, seed: Any, max_steps: int = 20_000, overrides: Mapping[str, Any] | None = None,
    image: str | None = None, text_weight: Any = None, view_weight: Any = None,
) -> RunConfig:
    """A validated ``RunConfig`` from the page's fields, or a one-line ``UserError`` naming the bad one.

    ``overrides`` (render size, views per step, snapshot period, ...) come from the operator, never from the page.
    ``image``: an input view's path makes the run image-to-3D (an empty prompt then takes the toy world's caption
    of it), with the two priors' weights ``text_weight`` and ``view_weight`` (None: Magic123's).
    """
    prompt = _text(prompt, "prompt")
    if not prompt and not image:
        raise UserError("the prompt is empty")
    negative = _text(negative_prompt, "negative prompt")
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone '{_clip(str(backbone))}'; choose one of: {', '.join(BACKBONES)}")
    if method not in APP_METHODS:
        raise UserError(f"unknown method '{_clip(str(method))}'; choose one of: {', '.join(APP_METHODS)}")
    values: dict[str, Any] = {"batch": PRESETS.get(backbone, {}).get("batch", 4), **(overrides or {})}
    values.update(
        prompt=prompt, negative_prompt=negative, prior=prior, backbone=backbone, method=method,
        cfg=checked_cfg(cfg, method), lr_scale=page_knob("lr_scale", lr_scale),
        learned_lr=page_knob("learned_lr", learned_lr) if learns_parameters(method) else None,
        steps=_integer(steps, "number of steps", 1, max_steps), seed=_integer(seed, "seed", 0, MAX_SEED),
    )
    if image:
        from lods.runs.image3d import with_image

        values["image3d"] = {**values.get("image3d", {}), **{
            name: check_weight(_number(value, KNOB_LABELS[name]), KNOB_LABELS[name])
            for name, value in (("text_weight", text_weight), ("view_weight", view_weight)) if value is not None}}
        config = with_image(RunConfig.from_dict(values), image)
    else:
        config = RunConfig.from_dict(values)
    config.validate()
    return config
