"""Training in GPU slices, for Hugging Face ZeroGPU Spaces.

On ZeroGPU a GPU exists only inside a call decorated with ``@spaces.GPU``, of bounded duration, and
that call runs in a forked worker process: its arguments and its return value are pickled across. A
background CUDA thread cannot train there, but a run can go in slices. The run's own
:class:`~lods.trainer.Trainer` stays in the app's process on the CPU (knobs, previews, snapshots,
checkpoints); each slice sends its state (the checkpoint dictionary: scene, optimizer, learned
parameters, knobs, history, random states) to a decorated call, which rebuilds the trainer on the GPU,
trains until its time is up, and returns the new state. Between slices the page's knobs take effect,
Pause and Stop are honoured, previews are rendered and a checkpoint is written. A sliced run reaches
the same parameters as a continuous one with the same seed (tested on CPU).

Outside a ZeroGPU Space ``spaces.GPU`` returns the function unchanged, and the app trains in its
continuous background thread as before (dedicated GPU Spaces, local GPUs, CPU).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from lods.config import RunConfig
from lods.trainer import Trainer, shared_prior

SLICE_SECONDS = 50.0  # training time per GPU call
GPU_DURATION = 90  # seconds asked of ZeroGPU per call: the slice, building the trainer, moving the state


def on_zerogpu(env: dict[str, str] | os._Environ = os.environ) -> bool:
    """True on a ZeroGPU Space (the ``spaces`` package reads the same variable)."""
    return env.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def gpu(duration: int = GPU_DURATION) -> Callable[[Callable], Callable]:
    """``spaces.GPU(duration=...)``: the GPU slot on ZeroGPU, the function itself elsewhere; without the
    ``spaces`` package installed, the function itself too (there is no ZeroGPU to ask then)."""
    try:
        import spaces
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (dicts, lists, tuples) copied to the CPU, ready to pickle."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def train_slice(
    config: dict[str, Any], state: dict[str, Any], seconds: float, max_steps: int | None = None, prior: Any = None
) -> tuple[dict[str, Any], str, str]:
    """One slice, on ``config["device"]``: rebuild the trainer, load ``state``, train for ``seconds`` (or
    ``max_steps`` steps), return the new state on the CPU with the status ("running", "done" or "diverged")
    and the trainer's message. Takes and returns only picklable values: on ZeroGPU it runs in another
    process. ``prior`` is for callers in the same process (tests); a worker loads its own, once."""
    run = RunConfig.from_dict(config)
    trainer = Trainer(run, prior=prior or shared_prior(run.prior, run.device or "cuda"))
    try:
        trainer.load_state(state, where="the slice's state")
        trainer.begin()
        deadline, start = time.monotonic() + seconds, trainer.step
        while trainer.advance():  # at least one step per slice, however short
            if time.monotonic() >= deadline or (max_steps is not None and trainer.step - start >= max_steps):
                break
        return to_cpu(trainer.state()), trainer.status, trainer.message
    finally:
        trainer.close()


# Decorated when this module is imported (the app imports it at start-up): ZeroGPU looks for its
# decorated functions before the server starts.
gpu_train_slice = gpu()(train_slice)


def run_sliced(
    trainer: Trainer,
    device: str = "cuda",
    seconds: float | None = None,
    max_steps: int | None = None,
    call: Callable[..., tuple[dict[str, Any], str, str]] | None = None,
    prior: Any = None,
) -> str:
    """Train ``trainer`` (built on the CPU) to the end in slices of ``seconds`` (``SLICE_SECONDS``) on
    ``device``; returns its final status.

    ``call`` runs one slice (default: ``gpu_train_slice``, :func:`train_slice` under ``spaces.GPU``);
    ``prior`` is handed to it (same-process callers only). Between slices: Pause waits, Stop ends the
    run, the new state is loaded into ``trainer``, a step event goes to its subscribers, a snapshot is published and,
    with an output folder, a checkpoint is written."""
    call = call or gpu_train_slice
    seconds = SLICE_SECONDS if seconds is None else seconds
    config = replace(trainer.config, device=device).to_dict()
    trainer.trains_on = device  # config.yaml reports where the training ran
    trainer.begin()
    while trainer.status == "running":
        trainer._resume_event.wait()
        with trainer.lock:
            if trainer.knobs.stop:
                trainer.status = "stopped"
                break
        if trainer.step >= trainer.config.steps:
            trainer.status = "done"
            break
        extra = {"prior": prior} if prior is not None else {}
        state, status, message = call(config, to_cpu(trainer.state()), seconds, max_steps, **extra)
        with trainer.scene_lock:
            with trainer.lock:  # knobs turned during the slice win over the ones it started with
                knobs, changes = copy.copy(trainer.knobs), list(trainer.knob_changes)
            trainer.load_state(state, where="the slice's state")
            with trainer.lock:
                trainer.knobs, trainer.knob_changes = knobs, changes
        trainer.emit("step", stats=trainer.history[-1] if trainer.history else {})
        if status not in ("running", "done"):  # diverged, or failed (out of memory)
            trainer.status, trainer.message = status, message
            break
        trainer.publish()
        if trainer.out_dir:
            trainer.save_checkpoint(trainer.out_dir)
    return trainer.finish()
