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
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lods.errors import UserError
from lods.guidance import DEFAULT_LR, METHODS
from lods.runs import PRESETS, with_toy_gaussian_cap
from lods.trainer import BACKBONES, TOY_LEARNED_LR, RunConfig, check_cfg, check_lr

BUILTIN_PRIORS = ("toy", "sd21")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
APP_METHODS = tuple(m for m in METHODS if m != "dds")  # dds edits an image: `python -m lods edit`
CFG_MAX = 10000.0  # the paper uses 1000 in 3D; larger values show the VSD-like limit (floaters)
MAX_TEXT = 1000
MAX_SEED = 2**31 - 1
KNOBS = ("cfg", "scene_lr_scale", "learned_lr")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
            if not _HUB_ID.match(custom) or ".." in custom or Path(custom).exists():
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


def checked_cfg(value: Any) -> float:
    """A CFG weight the page accepts: the library's check, then at most ``CFG_MAX``."""
    cfg = check_cfg(_number(value, "CFG weight"))
    if cfg > CFG_MAX:
        raise UserError(f"the CFG weight must be between 1 and {CFG_MAX:g}, not {value}")
    return cfg


def checked_knob(name: str, value: Any) -> float:
    """A validated value for the live knob ``name`` (one of ``KNOBS``)."""
    if name == "cfg":
        return checked_cfg(value)
    if name == "scene_lr_scale":
        return check_lr(_number(value, "scene learning-rate scale"), "scene learning-rate scale")
    if name == "learned_lr":
        return check_lr(_number(value, "learned-parameter learning rate"), "learned-parameter learning rate")
    raise UserError(f"unknown knob {name!r}")


def default_learned_lr(method: str, prior: str) -> float:
    """The learned-parameter rate a run starts with: the toy prior's own, else the method's default."""
    if prior == "toy" and method in TOY_LEARNED_LR:
        return TOY_LEARNED_LR[method]
    return DEFAULT_LR.get(method, 0.0)


def learns_parameters(method: str) -> bool:
    """Whether ``method`` trains parameters of its own (alpha or a LoRA) with a learning rate."""
    return method in DEFAULT_LR


def build_run_config(
    *, prompt: Any, negative_prompt: Any, prior: str, backbone: Any, method: Any, cfg: Any, scene_lr_scale: Any,
    learned_lr: Any, steps: Any, seed: Any, max_steps: int = 20_000, overrides: Mapping[str, Any] | None = None,
) -> RunConfig:
    """A validated ``RunConfig`` from the page's fields, or a one-line ``UserError`` naming the bad one.

    ``overrides`` (render size, views per step, snapshot period, ...) come from the operator, never from the page.
    """
    prompt = _text(prompt, "prompt")
    if not prompt:
        raise UserError("the prompt is empty")
    negative = _text(negative_prompt, "negative prompt")
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone '{_clip(str(backbone))}'; choose one of: {', '.join(BACKBONES)}")
    if method not in APP_METHODS:
        raise UserError(f"unknown method '{_clip(str(method))}'; choose one of: {', '.join(APP_METHODS)}")
    values: dict[str, Any] = {"batch": PRESETS.get(backbone, {}).get("batch", 4), **(overrides or {})}
    values.update(
        prompt=prompt, negative_prompt=negative, prior=prior, backbone=backbone, method=method,
        cfg=checked_cfg(cfg), lr_scale=checked_knob("scene_lr_scale", scene_lr_scale),
        learned_lr=checked_knob("learned_lr", learned_lr) if learns_parameters(method) else None,
        steps=_integer(steps, "number of steps", 1, max_steps), seed=_integer(seed, "seed", 0, MAX_SEED),
    )
    config = RunConfig.from_dict(with_toy_gaussian_cap(values))
    config.validate()
    return config
