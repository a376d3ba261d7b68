"""``generate`` and ``edit``: one run into a run folder (:mod:`lods.runs.folder`), with a progress bar."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from tqdm import tqdm

from lods import checkpoint
from lods.config import RunConfig
from lods.errors import UserError
from lods.profiling import process_age
from lods.runs.folder import prepare_out, write_run_folder
from lods.trainer import Trainer, load_prior, resolve_device, write_config

T = TypeVar("T")

PRESETS = {
    # Defaults per backbone on the embedded prior (CPU-friendly); YAML files in examples/ override them.
    "gs": {"steps": 600, "batch": 2},
    "nerf": {"steps": 600, "batch": 1},
    "image": {"steps": 500, "batch": 1, "cfg": 100.0},
}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The config keys of a YAML file; a one-line ``UserError`` for a missing, unreadable or non-mapping file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found" if not path.exists() else f"{path} is not a file")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not a text file") from err
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(loaded, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    return loaded


def apply_sets(cfg: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` overrides (dotted keys for sections, values in YAML) applied to ``cfg`` in place."""
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, not {item!r}")
        key, value = item.split("=", 1)
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {p} is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise UserError(f"--set {key}: {value!r} is not a value ({str(err).splitlines()[0]})") from err
    return cfg


def with_preset(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with its backbone's CPU-friendly defaults (``PRESETS``) where it sets nothing."""
    for k, v in PRESETS.get(cfg.get("backbone", "gs"), {}).items():
        cfg.setdefault(k, v)
    return cfg


def checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The config a checkpoint (a file, or a run folder's latest) ran with, as plain values."""
    return checkpoint.load(path, tensors=False)["config"]


def read_image(path: str | Path, read: Callable[[Any], T]) -> T:
    """``read(opened PIL image)`` for the image file at ``path``; a one-line ``UserError`` for a missing,
    unreadable, truncated, corrupt or huge file (``read`` may raise its own ``UserError`` too)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} not found" if not path.exists() else f"{path} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                return read(opened)
    except UnidentifiedImageError as err:
        raise UserError(f"{path} is not an image file") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UserError(f"{path} is too large to be an input image ({str(err).split('.')[0]})") from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt files
        raise UserError(f"{path} cannot be read as an image ({str(err).splitlines()[0][:100]})") from err


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """The image at ``path`` as (1, 3, size, size) in [0, 1]."""
    from PIL import Image

    img = read_image(path, lambda opened: opened.convert("RGB").resize((size, size), Image.Resampling.LANCZOS))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


def generate(config: RunConfig | dict[str, Any], out: str | Path, resume: str | Path | None = None,
             prior: Any = None, progress: bool = True, video: bool = True) -> dict[str, Any]:
    """Text to 3D (``backbone`` gs or nerf) or to an image: train ``config`` into the run folder ``out`` and
    return its summary. ``resume``: a run folder or checkpoint to continue (``config`` must keep what the
    checkpoint depends on; its live knobs and learning rates may differ). ``prior``: an already loaded prior."""
    config = config if isinstance(config, RunConfig) else RunConfig.from_dict(with_preset(dict(config)))
    config.validate()
    out = prepare_out(out)
    if progress and prior is None:
        print(f"loading the prior '{config.prior}' ...", flush=True)
    trainer = Trainer(config, prior=prior, out_dir=out)
    if resume is not None:
        trainer.load_checkpoint(resume)
    return run_and_export(trainer, out, show_progress=progress, video=video)


def edit(config: RunConfig | dict[str, Any], image: str | Path, out: str | Path, prior: Any = None,
         progress: bool = True) -> dict[str, Any]:
    """Text-guided editing of ``image`` (section 4.4): ``config.source_prompt`` describes it, ``config.prompt``
    the edit; DDS by default. Returns the run's summary."""
    if not isinstance(config, RunConfig):
        config = RunConfig.from_dict(with_preset({"backbone": "image", "method": "dds", **config}))
    config.validate()
    out = prepare_out(out)
    prior = prior or load_prior(config.prior, resolve_device(config.device))
    trainer = Trainer(config, prior=prior, out_dir=out, init_image=load_image(image, prior.image_size))
    return run_and_export(trainer, out, show_progress=progress)


def run_and_export(trainer: Trainer, out: Path, show_progress: bool = True, video: bool = True) -> dict[str, Any]:
    """Train with a progress bar, then write the run folder ``out`` (``video=False``: no turntable video, for
    benchmarks); returns the summary. A divergence ends in a ``UserError`` and writes nothing."""
    out.mkdir(parents=True, exist_ok=True)
    if trainer.checkpoint_step is None:  # a fresh run; a resumed one keeps its config.yaml until a checkpoint
        write_config(out / "config.yaml", trainer.resolved_config())
    start_step, t0 = trainer.step, time.perf_counter()
    bar = tqdm(
        total=trainer.config.steps,
        initial=trainer.step,
        desc=trainer.config.method,
        unit="it",
        disable=not show_progress,
    )

    first: list[float | None] = []

    def progress(step: int, total: int, stats: dict) -> None:
        if not first:
            first.append(process_age())
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(cfg=stats["cfg"], t=int(stats.get("t", 0)), loss=f"{stats['loss']:.3g}")

    try:
        status = trainer.run(progress)
    finally:
        bar.close()
        trainer.close()
    if status == "diverged":  # nothing written: the folder's previous results and checkpoints stay as they were
        raise UserError(trainer.message)
    seconds = time.perf_counter() - t0
    if show_progress:
        began = f" (the first step done {first[0]:.1f} s after the command started)" if first and first[0] else ""
        print(f"{status}: {trainer.step - start_step} steps in {seconds:.1f} s{began}; "
              f"writing the results to {out} ...", flush=True)
    t_export = time.perf_counter()
    summary, files = write_run_folder(trainer, out, status, seconds=seconds, start_step=start_step, video=video)
    if show_progress:
        for path in files:
            print(f"  {path.name:28s} {_size(path.stat().st_size):>9s}")
        print(f"results written in {time.perf_counter() - t_export:.1f} s")
    return summary


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024 or unit == "MB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} MB"


