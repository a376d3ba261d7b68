"""One training job per process: start, steer, stop and clean up a background :class:`Trainer` run.

The page (``app/ui.py``) and the tests talk to a :class:`JobManager` only; nothing here imports
gradio. A job belongs to the browser session that started it (its ``owner``): only that session may
pause, stop, reset or turn its knobs, every other session watches it read-only. Each job writes into
a temporary folder of its own, and that folder is the only place its downloads come from.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from app.config import page_knob
from lods import zerogpu
from lods.config import Knobs, RunConfig, config_knob, with_knobs
from lods.errors import UserError, one_line
from lods.priors.base import DiffusionPrior
from lods.runs import write_run_folder
from lods.runs.compare import Comparison, Slot
from lods.runs.image3d import build_trainer
from lods.trainer import PriorCache, Snapshot, Trainer, resolve_device, shared_prior

log = logging.getLogger(__name__)

ACTIVE_PHASES = ("loading", "running", "paused", "exporting")
MAX_QUEUE = 8
MAX_KEPT = 16  # finished runs kept for their owners at most; the oldest go first
ABANDON_AFTER_S = 180.0  # a run whose owner has not polled for this long is stopped (its results are written)
KEEP_FILES_S = 3600.0  # a finished run's files are deleted this long after its owner's last poll
PriorFactory = Callable[[str, torch.device], DiffusionPrior]
SnapshotListener = Callable[[Snapshot], None]
TrainerListener = Callable[[Trainer], None]


class JobBusy(UserError):
    """A job is already active in this process."""


class NotOwner(UserError):
    """The job belongs to another browser session."""


@dataclass(eq=False)
class Job:
    """One run: its config, its trainer (once built), its thread and its own output folder."""

    id: int
    owner: str
    config: RunConfig
    out_dir: Path
    phase: str = "loading"  # loading, running, exporting, then done, stopped, diverged or failed
    message: str = ""
    files: list[Path] = field(default_factory=list)
    trainer: Trainer | None = None
    thread: threading.Thread | None = None
    started_at: float = field(default_factory=time.time)
    stop_requested: bool = False
    pause_requested: bool = False
    export_on_stop: bool = True
    compare_configs: list[RunConfig] | None = None  # a comparison (Compare tab) instead of one run
    comparison: Comparison | None = None

    @property
    def is_comparison(self) -> bool:
        return self.compare_configs is not None

    @property
    def state(self) -> str:
        """``phase``, with "paused" for a running job whose trainer (or comparison) is paused."""
        if self.phase == "running":
            if self.comparison is not None and self.comparison.paused:
                return "paused"
            if self.trainer is not None and self.trainer.knobs.paused:
                return "paused"
        return self.phase

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_PHASES

    def snapshot(self) -> Snapshot | None:
        return self.trainer.latest() if self.trainer is not None else None

    def knob(self, name: str) -> Any:
        """The live value of knob ``name`` (the config's before the trainer exists)."""
        return getattr(self.trainer.knobs, name) if self.trainer is not None else config_knob(self.config, name)


class JobManager:
    """Holds at most one active :class:`Job`; every method is safe to call from any thread.

    ``prior_factory(name, device)`` loads a prior (default: ``lods.trainer.load_prior``); the last one
    loaded is kept for the next run with the same name and device. Listeners (the 3D viewer) receive
    every published snapshot and each new run's trainer before it trains; their errors are logged,
    never raised into training.
    """

    def __init__(self, prior_factory: PriorFactory | None = None, listeners: list[SnapshotListener] | None = None,
                 join_timeout: float = 30.0, abandon_after_s: float = ABANDON_AFTER_S) -> None:
        self._lock = threading.Lock()
        self._job: Job | None = None
        self._ids = itertools.count(1)
        self._prior = PriorCache(prior_factory) if prior_factory is not None else shared_prior
        self._listeners: list[SnapshotListener] = list(listeners or [])
        self._trainer_listeners: list[TrainerListener] = []
        self._queue: list[tuple[str, RunConfig, list[RunConfig] | None]] = []  # (owner, config, comparison)
        self._kept: dict[str, Job] = {}  # finished runs whose owners have not looked at them when the next began
        self._closed = False
        self._reset_listeners: list[Callable[[], None]] = []
        self._last_seen: dict[str, float] = {}  # owner -> time.monotonic() of its latest poll
        self.join_timeout = join_timeout
        self.max_queue = MAX_QUEUE
        self.max_kept = MAX_KEPT
        self.abandon_after_s = abandon_after_s
        self.keep_files_s = KEEP_FILES_S
        self._watchdog: threading.Thread | None = None

    # ------------------------------------------------------------------ reading

    def current(self) -> Job | None:
        """The active job, or the last finished one while its files are kept; None before the first."""
        with self._lock:
            return self._job

    def queue_position(self, owner: str) -> int | None:
        """1 for the next run to start, ...; None when ``owner`` has nothing queued."""
        with self._lock:
            return next((i + 1 for i, (o, _, _) in enumerate(self._queue) if o == owner), None)

    def queue_length(self) -> int:
        with self._lock:
            return len(self._queue)

    def kept(self, owner: str) -> Job | None:
        """``owner``'s finished run, kept with its files after a queued run took the device."""
        with self._lock:
            return self._kept.get(owner)

    def add_listener(self, listener: SnapshotListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def add_reset_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs when an owner resets (discards) the current run: the viewer clears its scene."""
        with self._lock:
            self._reset_listeners.append(listener)

    def touch(self, owner: str, now: float | None = None) -> None:
        """``owner``'s page is still there (its poll, at ``now``: ``time.monotonic()``); a run whose owner stops
        polling is stopped."""
        with self._lock:
            self._last_seen[owner] = time.monotonic() if now is None else now

    def check_abandoned(self, now: float | None = None) -> Job | None:
        """Stop the active job (writing its results and checkpoint) when its owner has not polled for
        ``abandon_after_s``, and drop queued runs of such owners; returns the job stopped, if any. The
        watchdog thread calls this every few seconds; a run started through the API whose client went
        away so frees the device."""
        now = time.monotonic() if now is None else now
        limit = self.abandon_after_s
        self._forget_files(now)
        with self._lock:
            gone = {o for o, t in self._last_seen.items() if now - t > limit}
            self._queue = [q for q in self._queue if q[0] not in gone]
            job = self._job
            if job is None or not job.active or job.stop_requested or job.owner not in gone:
                return None
            log.info("run %d: its page stopped polling %.0f s ago; stopping it", job.id,
                     now - self._last_seen[job.owner])
            job.message = f"stopped: its page was closed or stopped polling for over {limit:.0f} s"
            self._request_stop(job, export=True)
            if job.trainer is not None:
                job.trainer.message = job.message
            return job

    def _forget_files(self, now: float) -> None:
        """Delete the folders of finished runs whose owners have not polled for ``keep_files_s`` (kept runs,
        and the last run once it has ended): nothing stays on the server for a session that has gone."""
        with self._lock:
            left = {o for o, t in self._last_seen.items() if now - t > self.keep_files_s}
            old = [self._kept.pop(o) for o in list(self._kept) if o in left]
            job = self._job
            if job is not None and not job.active and job.owner in left and job.files:
                job.files, job.message = [], "its files were deleted after its session left"
                old.append(job)
            for o in left:
                if job is None or o != job.owner or not job.active:
                    self._last_seen.pop(o, None)
        for run in old:
            _remove(run.out_dir)

    def _watch(self) -> None:
        while True:
            time.sleep(max(0.05, min(5.0, self.abandon_after_s / 4)))
            with self._lock:
                if self._closed:
                    return
            try:
                self.check_abandoned()
            except Exception:
                log.exception("the abandoned-run check failed")

    def add_trainer_listener(self, listener: TrainerListener) -> None:
        """``listener(trainer)`` runs in the job's thread once a run's trainer is built, before it trains."""
        with self._lock:
            self._trainer_listeners.append(listener)

    # ------------------------------------------------------------------ starting

    @staticmethod
    def _check_comparison(configs: list[RunConfig]) -> None:
        if len(configs) < 2:
            raise UserError("a comparison needs at least two configurations")
        for c in configs:
            c.validate()

    def start_or_queue(self, config: RunConfig, owner: str, compare: list[RunConfig] | None = None) -> Job | int:
        """Start now when the device is free; else queue it (one entry per session, replacing an older one)
        and return its position. The queue's head starts when the active job ends."""
        if compare is not None:
            self._check_comparison(compare)
            config = compare[0]
        config.validate()
        with self._lock:
            busy = self._job is not None and self._job.active
            if busy and self._job.owner == owner:
                raise JobBusy("your run is still in progress; stop it first")
            if busy:
                self._last_seen.setdefault(owner, time.monotonic())
                mine = next((i for i, q in enumerate(self._queue) if q[0] == owner), None)
                if mine is not None:  # a new Start while queued replaces the run and keeps its place
                    self._queue[mine] = (owner, config, compare)
                    return mine + 1
                if len(self._queue) >= self.max_queue:
                    raise UserError(f"the queue is full ({self.max_queue} runs wait); try again later")
                self._queue.append((owner, config, compare))
                log.info("run queued at position %d: %s", len(self._queue), describe(config, compare))
                return len(self._queue)
        return self._start(config, owner, compare)

    def _start(self, config: RunConfig, owner: str, compare: list[RunConfig] | None) -> Job:
        with self._lock:
            if self._job is not None and self._job.active:
                whose = "yours" if self._job.owner == owner else "started in another session"
                what = "a comparison" if self._job.is_comparison else "a run"
                raise JobBusy(f"{what} is already in progress ({whose}); stop it or wait until it ends")
            job = self._begin(config, owner, compare)
        job.thread.start()
        return job

    def _begin(self, config: RunConfig, owner: str, compare: list[RunConfig] | None) -> Job:
        """Make ``job`` current (lock held); the previous run's folder goes, unless another session's
        finished run has files its owner may still want (then it is kept for them)."""
        previous = self._job
        job = Job(id=next(self._ids), owner=owner, config=config, compare_configs=compare,
                  out_dir=Path(tempfile.mkdtemp(prefix="lods-job-")))
        job.thread = threading.Thread(target=self._run, args=(job,), name=f"lods-job-{job.id}", daemon=True)
        self._job = job
        self._last_seen.setdefault(owner, time.monotonic())
        if self._watchdog is None and self.abandon_after_s > 0:
            self._watchdog = threading.Thread(target=self._watch, name="lods-abandoned-runs", daemon=True)
            self._watchdog.start()
        log.info("run %d started: %s", job.id, describe(config, compare))
        stale = [self._kept.pop(owner, None)]
        if previous is not None:
            if previous.owner != owner and previous.files:
                stale.append(self._kept.pop(previous.owner, None))
                self._kept[previous.owner] = previous
                while len(self._kept) > self.max_kept:
                    stale.append(self._kept.pop(next(iter(self._kept))))  # dicts keep insertion order
            else:
                stale.append(previous)
        for old in stale:
            if old is not None:
                _remove(old.out_dir)
        return job

    def _start_next(self) -> None:
        """The head of the queue takes the device (called when a job's thread ends)."""
        with self._lock:
            if self._closed or not self._queue or (self._job is not None and self._job.active):
                return
            owner, config, compare = self._queue.pop(0)
            job = self._begin(config, owner, compare)
        job.thread.start()

    def _notify(self, listeners: list[Callable[..., None]], value: Any) -> None:
        for listener in listeners:
            try:
                listener(value) if value is not None else listener()
            except Exception:
                log.exception("a job listener failed; training goes on")

    def _publish(self, snapshot: Snapshot) -> None:
        with self._lock:
            listeners = list(self._listeners)
        self._notify(listeners, snapshot)

    def _run(self, job: Job) -> None:
        """The job's thread: load the prior, build the trainer, train, export."""
        trainer = None
        try:
            config = job.config
            sliced = zerogpu.on_zerogpu() and not job.is_comparison  # the GPU only inside spaces.GPU calls
            device = torch.device("cpu") if sliced else resolve_device(config.device)
            prior = self._prior(config.prior, device)
            with self._lock:
                if job.stop_requested:
                    job.phase, job.message = "stopped", "stopped before training began"
                    return
                config = job.config  # with the knobs turned while the prior loaded
            if job.is_comparison:
                self._run_comparison(job, prior)
                return
            trainer = build_trainer(replace(config, device="cpu") if sliced else config, prior, out_dir=job.out_dir)
            trainer.subscribe(lambda e: self._publish(e.snapshot) if e.kind == "snapshot" else None)
            with self._lock:
                listeners = list(self._trainer_listeners)
            self._notify(listeners, trainer)
            with self._lock:
                job.trainer = trainer
                self._attach(job, trainer)
            status = zerogpu.run_sliced(trainer, device=config.device or "cuda") if sliced else trainer.run()
            files: list[Path] = []
            message = trainer.message
            if status == "done" or (status == "stopped" and job.export_on_stop and trainer.step > 0):
                with self._lock:
                    job.phase = "exporting"
                try:
                    files = write_results(trainer, job.out_dir, status)
                except Exception as err:
                    log.exception("writing the results of run %d failed", job.id)
                    message = f"the result files could not be written: {type(err).__name__}: {one_line(err)}"
            with self._lock:
                job.files, job.message, job.phase = files, message, status
        except UserError as err:
            with self._lock:
                job.phase, job.message = "failed", one_line(err)
        except Exception as err:
            log.exception("run %d failed", job.id)
            with self._lock:
                job.phase, job.message = "failed", f"internal error: {type(err).__name__}: {one_line(err)}"
        finally:
            if trainer is not None:
                try:
                    trainer.close()  # detach LoRA adapters from the cached prior
                except Exception:
                    log.exception("closing the estimator of run %d failed", job.id)
            log_end(job)
            self._start_next()

    @staticmethod
    def _attach(job: Job, runner: Trainer | Comparison) -> None:
        """The job starts running ``runner``, with a Stop or Pause pressed while it loaded (lock held)."""
        if job.stop_requested:
            runner.stop()
        elif job.pause_requested:
            runner.pause()
        job.phase = "running"

    def _run_comparison(self, job: Job, prior: DiffusionPrior) -> None:
        """The comparison's runs, in turn; each one's results go to ``out_dir/<n>-<method>-cfg-<w>/``."""
        comparison = Comparison(job.compare_configs, prior)
        try:
            with self._lock:
                job.comparison = comparison
                self._attach(job, comparison)
            statuses = comparison.run()
            files: list[Path] = []
            if job.export_on_stop:
                with self._lock:
                    job.phase = "exporting"
                for i, (config, trainer, status) in enumerate(zip(job.compare_configs, comparison.trainers, statuses)):
                    if trainer.step == 0 or status == "diverged":
                        continue
                    label = Slot(config.method, config.cfg).label.replace(" · CFG ", "-cfg-").replace("∞", "inf")
                    files += write_results(trainer, job.out_dir / f"{i + 1}-{label}", status)
            messages = [f"{c.method}: {t.message}" for c, t in zip(job.compare_configs, comparison.trainers)
                        if t.message]
            final = "done" if all(s == "done" for s in statuses) else (
                "stopped" if "stopped" in statuses else next(s for s in statuses if s != "done"))
            with self._lock:
                job.files, job.message, job.phase = files, "; ".join(messages), final
        finally:
            comparison.close()

    # ------------------------------------------------------------------ steering (owner only)

    def _owned_active(self, owner: str) -> Job | None:
        """The active job if ``owner`` owns it; None when nothing is active; ``NotOwner`` otherwise. Lock held."""
        job = self._job
        if job is None or not job.active:
            return None
        if job.owner != owner:
            raise NotOwner("this run belongs to another session; you are watching it read-only")
        return job

    def set_knobs(self, owner: str, **knobs: Any) -> Job | None:
        """Change live knobs (``lods.config.LIVE_KNOBS``) of the owner's active job; None when none is active.

        Values are checked (the page's limits, then ``Knobs.replace``) before the job is touched; the trainer
        applies them within one step and records them in its ``knob_changes``; before the trainer exists they
        go into the job's config.
        """
        checked = {name: page_knob(name, value) for name, value in knobs.items()}
        Knobs(cfg=1.0, text_weight=0.0, view_weight=0.0).replace(None, **checked)  # ranges first: refused early
        with self._lock:
            job = self._owned_active(owner)
            if job is None:
                return None
            if job.is_comparison:
                raise UserError("a comparison keeps the settings it started with; stop it to change them")
            if job.trainer is None:
                # the same checks as a running trainer's
                job.config = with_knobs(job.config, Knobs.of(job.config).replace(job.config.method, **checked))
            else:
                job.trainer.set_knobs(**checked)
            return job

    def set_paused(self, owner: str, paused: bool) -> Job | None:
        with self._lock:
            job = self._owned_active(owner)
            if job is None:
                return None
            job.pause_requested = paused
            if job.comparison is not None:
                (job.comparison.pause if paused else job.comparison.resume)()
            elif job.trainer is not None:
                job.trainer.set_knobs(paused=paused)
            return job

    def stop(self, owner: str, export: bool = True, wait: float | None = None) -> Job | None:
        """Stop the owner's active job (result files are written when ``export``); join its thread up to ``wait`` s."""
        with self._lock:
            job = self._owned_active(owner)
            if job is None:
                return None
            self._request_stop(job, export)
        if wait:
            job.thread.join(wait)
        return job

    @staticmethod
    def _request_stop(job: Job, export: bool) -> None:
        job.stop_requested, job.export_on_stop = True, job.export_on_stop and export
        if job.comparison is not None:
            job.comparison.stop()
        if job.trainer is not None:
            job.trainer.stop()

    def discard(self, owner: str) -> bool:
        """Reset: stop the owner's job without writing results, wait for its thread, delete its folder; the
        owner's queued run and kept results go too."""
        with self._lock:
            self._queue = [q for q in self._queue if q[0] != owner]
            kept = self._kept.pop(owner, None)
            if kept is not None:
                _remove(kept.out_dir)
            job = self._job
            if job is None:
                return False
            if job.owner != owner:
                raise NotOwner("this run belongs to another session; you are watching it read-only")
            if job.active:
                self._request_stop(job, export=False)
        job.thread.join(self.join_timeout)
        with self._lock:
            if job.thread.is_alive():
                raise UserError("the run is still finishing its current step; press Reset again in a moment")
            if self._job is job:
                self._job = None
            listeners = list(self._reset_listeners)
        _remove(job.out_dir)
        self._notify(listeners, None)
        return True

    def release(self, owner: str) -> None:
        """The owner's tab closed: stop its active job without writing results (no wait), drop its queued run."""
        with self._lock:
            self._queue = [q for q in self._queue if q[0] != owner]
            job = self._job
            if job is not None and job.active and job.owner == owner:
                self._request_stop(job, export=False)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop any active job, join its thread and delete its folder (process exit, tests)."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            job, self._job = self._job, None
            kept, self._kept = list(self._kept.values()), {}
            if job is not None and job.active:
                self._request_stop(job, export=False)
        if job is not None:
            job.thread.join(self.join_timeout if timeout is None else timeout)
            _remove(job.out_dir)
        for old in kept:
            _remove(old.out_dir)
        self._prior.clear()


def write_results(trainer: Trainer, out_dir: Path, status: str = "done") -> list[Path]:
    """The run folder's files (``lods.runs.write_run_folder``, the CLI's writer): results, summary, metrics,
    config and checkpoint."""
    return write_run_folder(trainer, out_dir, status)[1]


def describe(config: RunConfig, compare: list[RunConfig] | None = None) -> str:
    """One line for the server log: what a run is."""
    prompt = config.prompt if len(config.prompt) <= 60 else config.prompt[:57] + "..."
    if compare is not None:
        return f"a comparison of {len(compare)} configurations, {prompt!r}"
    return (f"{config.method} on {config.backbone}, prior {config.prior}, cfg {config.cfg:g}, {config.steps} steps, "
            f"{prompt!r}")


def log_end(job: Job) -> None:
    """The server log's line when a run ends: how, after how many steps, and why when it went wrong."""
    trainers = job.comparison.trainers if job.comparison is not None else [job.trainer] if job.trainer else []
    steps = sum(t.step for t in trainers)
    text = f"run {job.id} {job.phase} after {steps} steps" + (f": {job.message}" if job.message else "")
    (log.warning if job.phase in ("diverged", "failed") else log.info)(text)


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
