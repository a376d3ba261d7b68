"""``python -m app.loadtest``: many browser sessions on the app while a run trains.

Launches the app on a free loopback port, starts a Gaussian-splat run from one session, measures the
run's iterations per second alone, then with ``--clients`` sessions (``gradio_client``, one thread
each) polling like the page does (every ``--poll`` seconds) and turning knobs: the run's owner changes
the CFG weight and the learning-rate scale, the other sessions try to (and are told they watch
read-only). Reports errors, response times (median, 95th percentile, max) per endpoint and the
slowdown of training. A benchmark: it prints figures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from typing import Any

GOOD_RUN = dict(prompt="a red cube", negative_prompt="", prior="toy", custom_model="", backbone="gs",
                method="lods-embed", cfg=100.0, scene_lr_scale=1.0, learned_lr=3e-3, steps=20_000, seed=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rate(trainer: Any, seconds: float) -> float:
    s0, t0 = trainer.step, time.perf_counter()
    time.sleep(seconds)
    return (trainer.step - s0) / (time.perf_counter() - t0)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_load_test(
    clients: int = 10, seconds: float = 30.0, poll_s: float = 0.75, knob_every: int = 3, warmup_s: float = 10.0,
    prior_factory: Any = None, run: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The measurement; ``prior_factory``, ``run`` and ``overrides`` let a test use a tiny prior."""
    from gradio_client import Client

    from app.jobs import JobManager
    from app.ui import AppSettings, build_demo

    manager = JobManager(prior_factory=prior_factory) if prior_factory else JobManager()
    demo = build_demo(manager, AppSettings(run_overrides=overrides or {}))
    port = _free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    sessions: list[Any] = []
    try:
        owner = Client(url, verbose=False)
        sessions.append(owner)
        notice = owner.predict(*{**GOOD_RUN, **(run or {})}.values(), api_name="/start")
        if "Started" not in notice:
            raise RuntimeError(f"the run did not start: {notice}")
        job = manager.current()
        end = time.monotonic() + 120
        while (job.trainer is None or job.trainer.step < 5) and time.monotonic() < end:
            time.sleep(0.1)
        if job.trainer is None:
            raise RuntimeError(f"the run did not begin training: {job.message}")
        time.sleep(warmup_s)
        alone = _rate(job.trainer, seconds)

        latencies: dict[str, list[float]] = {"poll": [], "set_cfg": [], "set_scene_lr": []}
        errors: list[str] = []
        refused = [0]
        lock = threading.Lock()
        stop = threading.Event()
        watchers = [Client(url, verbose=False) for _ in range(clients - 1)]
        sessions += watchers

        def session(c: Any, index: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                calls = [("poll", ())]
                if i % knob_every == 0:
                    k = i // knob_every
                    calls.append(("set_cfg", (50.0 + (k % 7) * 10,)) if k % 2 else
                                 ("set_scene_lr", (1.0 - 0.1 * (k % 4 == 0),)))
                for name, args in calls:
                    t0 = time.perf_counter()
                    try:
                        out = c.predict(*args, api_name=f"/{name}")
                    except Exception as err:  # noqa: BLE001 - every failure is a finding of the load test
                        with lock:
                            errors.append(f"{name}: {type(err).__name__}: {err}")
                        continue
                    dt = time.perf_counter() - t0
                    with lock:
                        latencies[name].append(dt)
                        if name != "poll" and "another session" in str(out):
                            refused[0] += 1
                        elif name != "poll" and index == 0 and "set to" not in str(out):
                            errors.append(f"{name}: unexpected answer {out!r}")
                stop.wait(poll_s)

        threads = [threading.Thread(target=session, args=(c, i), daemon=True)
                   for i, c in enumerate([owner, *watchers])]
        changes_before = len(job.trainer.knob_changes)
        for t in threads:
            t.start()
        time.sleep(2.0)  # every session has connected
        loaded = _rate(job.trainer, seconds)
        stop.set()
        for t in threads:
            t.join(30)
        every = [x for v in latencies.values() for x in v]
        report = {
            "clients": clients,
            "seconds": seconds,
            "poll_s": poll_s,
            "requests": len(every),
            "errors": len(errors),
            "error_samples": errors[:5],
            "refused_read_only": refused[0],
            "knob_changes_applied": len(job.trainer.knob_changes) - changes_before,
            "latency_ms": {
                name: {"n": len(v), "p50": 1000 * statistics.median(v) if v else float("nan"),
                       "p95": 1000 * _percentile(v, 0.95), "max": 1000 * max(v) if v else float("nan")}
                for name, v in latencies.items()
            },
            "p95_ms_all": 1000 * _percentile(every, 0.95),
            "it_per_s_alone": alone,
            "it_per_s_loaded": loaded,
            "slowdown": 1 - loaded / alone if alone > 0 else float("nan"),
        }
        return report
    finally:
        for c in sessions:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        manager.shutdown()
        demo.close()


def main(argv: list[str] | None = None) -> int:
    from lods.export import print_and_save_json

    p = argparse.ArgumentParser(prog="python -m app.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--seconds", type=float, default=30.0, help="length of each measurement window")
    p.add_argument("--poll", type=float, default=0.75, help="seconds between a session's polls (the page: 0.75)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    report = run_load_test(clients=args.clients, seconds=args.seconds, poll_s=args.poll)
    print_and_save_json(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
