"""Checkpoints that can be loaded without running code: tensors in safetensors, the rest in JSON.

A checkpoint is one ``.safetensors`` file. Its tensors are the run's tensors (scene, optimizer moments,
learned embedding or LoRA, RNG states); its metadata holds, under ``"lods_checkpoint"``, a JSON tree of
everything else (step, config, knobs, history, optimizer hyper-parameters) in which each tensor is a
reference ``{"__tensor__": key}``. Loading parses JSON and reads tensors; nothing is unpickled, so a
file from anywhere can at worst be refused. One file means one atomic rename: a checkpoint is whole or
absent, never half-written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lods.errors import UserError
from lods.export import atomic_path

FORMAT = "lods-checkpoint/1"
LATEST = "checkpoint.safetensors"
PREVIOUS = "checkpoint-prev.safetensors"
_KEY = "lods_checkpoint"


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of ``obj`` with tensors and arrays moved into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError("checkpoint dictionaries need str or int keys")
        # int keys (optimizer state ids) are kept as a list of pairs, so that JSON does not turn them into str
        return {"__dict__": [[k, _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor] | None) -> Any:
    """The tree :func:`_flatten` made; with ``tensors`` None, every tensor and array is None (not read)."""
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return None if tensors is None else tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return None if tensors is None else tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save(path: str | Path, state: dict[str, Any], keep_previous: bool = True) -> Path:
    """Write ``state`` atomically to ``path``; the file already there becomes ``checkpoint-prev``."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors)
    meta = {"format": FORMAT, _KEY: json.dumps(tree, allow_nan=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        if keep_previous and path.exists():
            path.replace(path.with_name(PREVIOUS))
    return path


def load(path: str | Path, tensors: bool = True) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`; a ``UserError`` for anything else. ``tensors=False`` reads
    only the JSON part (the config, step, history), every tensor None: cheap, for a resume's settings."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = find(path)
    if path.suffix == ".pt":
        raise UserError(f"{path} is a pickle checkpoint of an earlier version, which is never loaded (it could run "
                        "code); start a new run")
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or _KEY not in meta:
                raise UserError(f"{path} is not a LODS Studio checkpoint")
            read = {k: f.get_tensor(k) for k in f.keys()} if tensors else None  # noqa: SIM118
        state = _unflatten(json.loads(meta[_KEY]), read)
    except UserError:
        raise
    except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
        hint = ""
        if path.name == LATEST and (path.parent / PREVIOUS).is_file():
            hint = f"; the one before it is {path.parent / PREVIOUS} (pass it to --resume)"
        raise UserError(f"{path} is damaged or not a checkpoint ({str(err).splitlines()[0][:100]}){hint}") from err
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise UserError(f"{path} is not a LODS Studio checkpoint")
    return state


def find(folder: str | Path) -> Path:
    """The latest checkpoint in a run folder; a ``UserError`` that says why there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a run folder")
    if (folder / LATEST).is_file():
        return folder / LATEST
    if (folder / "checkpoint.pt").is_file():
        raise UserError(f"{folder} holds only a pickle checkpoint of an earlier version, which is never loaded "
                        "(it could run code); start a new run")
    raise UserError(f"{folder} has no checkpoint to resume from")
