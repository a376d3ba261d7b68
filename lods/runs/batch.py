"""``python -m lods batch``: many prompts x methods, one result folder each, resumable, optionally on Ray.

A job is a plain config dict (the :class:`~lods.config.RunConfig` keys) and an output folder. A job
whose folder holds a ``summary.json`` of a finished run is skipped, so an interrupted batch picks up
where it stopped. Executors: ``sequential`` (this process) or ``ray`` (one task per job, one GPU each
when the cluster has GPUs, else one CPU each; ``--ray-address`` joins an existing cluster, whose
nodes need this package installed).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lods import checkpoint
from lods.errors import UserError

EXECUTORS = ("sequential", "ray")


@dataclass
class Job:
    """One run: its config (RunConfig keys) and the folder that receives its files."""

    config: dict[str, Any]
    out: str


def slug(text: str, limit: int = 48) -> str:
    """A folder name for a prompt: lower-case words joined by dashes, plus a short hash against collisions."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return f"{words or 'prompt'}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"prompt file {p} not found")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [x for x in prompts if x and not x.startswith("#")]
    if not prompts:
        raise UserError(f"{p} holds no prompts")
    return prompts


def claim(out: str | Path) -> bool:
    """Take the job folder for this process (``.claim`` holds its pid), so that several processes can work
    through the same batch side by side; False when a live process holds it. A dead holder's claim is taken
    over."""
    path = Path(out) / ".claim"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
            except (ValueError, OSError):
                pid = 0
            if pid == os.getpid():
                return True
            if pid and _alive(pid):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release_claim(out: str | Path) -> None:
    (Path(out) / ".claim").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Claimed(UserError):
    """Another process is running this job."""


def is_done(out: str | Path) -> bool:
    path = Path(out) / "summary.json"
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("status") == "done"
    except (json.JSONDecodeError, OSError):
        return False


def run_job(job: Job, video: bool = True, after: Callable[[Any, Path], Any] | None = None) -> dict[str, Any]:
    """Run one job in this process (skipped when already done); returns its summary. ``after(trainer, out)``
    is called on the trained scene (rebuilt from its checkpoint when the run was done before)."""
    from lods.config import RunConfig
    from lods.trainer import Trainer, shared_prior

    out = Path(job.out)
    config = RunConfig.from_dict(dict(job.config))
    config.validate()
    trainer = None
    if not is_done(out):
        from lods.runs import run_and_export

        trainer = Trainer(config, prior=shared_prior(config.prior, config.device), out_dir=out)
        try:
            ck = out / checkpoint.LATEST
            if ck.exists():  # an interrupted run continues from its last checkpoint
                trainer.load_checkpoint(ck)
            run_and_export(trainer, out, show_progress=False, video=video)
        except BaseException:
            trainer.close()  # leave the shared prior as it was (no adapters of a failed run)
            raise
    if after is not None:
        if trainer is None:
            trainer = Trainer(config, prior=shared_prior(config.prior, config.device))
            trainer.load_checkpoint(out / checkpoint.LATEST)
            trainer.close()
        after(trainer, out)
    return json.loads((out / "summary.json").read_text())


def _ray_map(fn: Callable[[Job], Any], jobs: list[Job], address: str | None) -> Iterable[tuple[Job, Any]]:
    try:
        import ray
    except ImportError as err:
        raise UserError("--executor ray needs Ray: pip install 'ray[default]'") from err
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        else:  # a local cluster: its workers import this package from the same checkout
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}}
        ray.init(**kwargs)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        remote = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, max_retries=0)(fn)
        pending = {remote.remote(job): job for job in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                yield job, ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                yield job, err.cause if isinstance(err.cause, Exception) else err
    finally:
        if started_here:
            ray.shutdown()


def map_jobs(
    fn: Callable[[Job], Any], jobs: list[Job], executor: str = "sequential", ray_address: str | None = None
) -> Iterable[tuple[Job, Any]]:
    """Apply ``fn`` to every job; yields ``(job, result or exception)`` as jobs finish (a failed job never
    stops the others)."""
    if executor not in EXECUTORS:
        raise UserError(f"unknown executor {executor!r}; choose one of: {', '.join(EXECUTORS)}")
    if executor == "ray":
        yield from _ray_map(fn, jobs, ray_address)
        return
    for job in jobs:
        try:
            yield job, fn(job)
        except UserError as err:
            yield job, err
        except Exception as err:  # a bug in one run must not end a long batch: log it beside the run
            Path(job.out).mkdir(parents=True, exist_ok=True)
            (Path(job.out) / "error.log").write_text(traceback.format_exc())
            yield job, err


def run_all(fn: Callable[[Job], Any], jobs: list[Job], executor: str, ray_address: str | None, desc: str,
            describe: Callable[[Job], str]) -> int:
    """``map_jobs`` with a progress bar; failures are reported (one line each, ``Claimed`` jobs silently) and
    counted."""
    failures = 0
    for job, result in tqdm(map_jobs(fn, jobs, executor, ray_address), total=len(jobs), desc=desc, unit="run"):
        if isinstance(result, BaseException) and not isinstance(result, Claimed):
            failures += 1
            tqdm.write(f"failed: {describe(job)}: {result}")
    return failures


def parse_methods(text: str | None, default: str | None = None) -> list[str]:
    """Comma-separated estimators for runs that generate (``dds`` edits: it has its own command)."""
    from lods.guidance import METHODS

    methods = [m.strip() for m in (text or default or "").split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS or METHODS[m].edit_only]
    if unknown or not methods:
        raise UserError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from: "
                        + ", ".join(m for m, cls in METHODS.items() if not cls.edit_only))
    return methods


def batch_jobs(prompts: list[str], methods: list[str], base: dict[str, Any], out: Path) -> list[Job]:
    return [
        Job({**base, "prompt": p, "method": m}, str(out / f"{i:03d}-{slug(p)}" / m))
        for i, p in enumerate(prompts)
        for m in methods
    ]


def _batch_job(job: Job) -> dict[str, Any]:
    return run_job(job)


SUMMARY_COLUMNS = ("prompt", "method", "status", "steps", "seconds", "it_per_s", "alignment", "saturation",
                   "clipped", "floater_score", "folder")


def write_summary_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def run_batch(prompts: list[str], methods: list[str], base: dict[str, Any], out: str | Path,
              executor: str = "sequential", ray_address: str | None = None) -> int:
    """Every prompt x method with the settings of ``base`` (plain config keys), one run folder each under ``out``;
    finished runs are skipped. Writes ``batch.csv``; returns 1 when a run failed, else 0."""
    from lods.config import RunConfig
    from lods.runs.folder import prepare_out

    if not prompts or not methods:
        raise UserError("a batch needs at least one prompt and one method")
    base = {k: v for k, v in base.items() if k not in ("prompt", "method")}
    RunConfig.from_dict({**base, "prompt": prompts[0], "method": methods[0]}).validate()
    out = prepare_out(out)
    jobs = batch_jobs(prompts, methods, base, out)
    todo = [j for j in jobs if not is_done(j.out)]
    print(f"{len(jobs)} runs ({len(prompts)} prompts x {len(methods)} methods): {len(jobs) - len(todo)} already "
          f"done, {len(todo)} to run on {executor}")
    failures = run_all(_batch_job, todo, executor, ray_address, "batch",
                       lambda job: f"{job.config['prompt']!r} / {job.config['method']}")
    rows = []
    for job in jobs:
        if is_done(job.out):
            s = json.loads((Path(job.out) / "summary.json").read_text())
            rows.append({**s, **s.get("final_metrics", {}), "folder": str(Path(job.out).relative_to(out))})
    write_summary_csv(rows, out / "batch.csv")
    print(f"{len(rows)} of {len(jobs)} runs done; table in {out / 'batch.csv'}")
    return 1 if failures else 0
