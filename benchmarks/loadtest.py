"""``python -m benchmarks.loadtest``: many browser sessions on the app while a run trains.

Launches the app on a free loopback port, starts a Gaussian-splat run from one session, measures the
run's iterations per second alone, then with ``--clients`` sessions (each speaking Gradio's queue
protocol as the page's JavaScript does, all in one asyncio loop) polling like the page does (every
``--poll`` seconds, slower where the server tells a watching page to) and turning knobs: the run's
owner changes the CFG weight and the learning-rate scale, the other sessions try to (and are told
they watch read-only). The clients run in a separate process, as browsers would on other machines
(``--clients-in-process`` puts them in the server's process instead). Reports errors, response times
(median, 95th percentile, max) per endpoint and the slowdown of training (against the mean of a quiet
window before and one after the loaded one).
A benchmark: it prints figures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import queue
import re
import statistics
import threading
import time
import uuid
from typing import Any

import torch

from lods.bench.speed import PeakMemory

STEP = re.compile(r"step (\d+) /")

GOOD_RUN = dict(prompt="a red cube", negative_prompt="", prior="toy", custom_model="", backbone="gs",
                method="lods-embed", cfg=100.0, lr_scale=1.0, learned_lr=3e-3, steps=20_000, seed=0)


def _rate(trainer: Any, seconds: float) -> float:
    s0, t0 = trainer.step, time.perf_counter()
    time.sleep(seconds)
    return (trainer.step - s0) / (time.perf_counter() - t0)


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0 for none)."""
    if pid is None:
        return 0.0
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class PageSession:
    """One browser session, speaking Gradio's queue protocol the way the page does.

    A kept-alive HTTP connection; each call joins the queue (``POST /gradio_api/queue/join``) and reads
    the session's event stream (``GET /gradio_api/queue/data``) until its result, as Gradio's own
    JavaScript client does. Much lighter than ``gradio_client`` (a new connection, a thread and a
    future per call), so that on a small machine the clients do not take the CPU the server needs.
    """

    def __init__(self, http: Any, url: str, session_hash: str, endpoints: dict[str, tuple[int, int]]) -> None:
        self.http, self.url, self.session_hash, self.endpoints = http, url, session_hash, endpoints

    @staticmethod
    async def endpoints_of(http: Any, url: str) -> dict[str, tuple[int, int]]:
        """api name -> (fn_index, number of inputs), from the app's config."""
        config = (await http.get(f"{url}config")).raise_for_status().json()
        return {d["api_name"]: (d["id"], len(d["inputs"])) for d in config["dependencies"] if d.get("api_name")}

    async def call(self, name: str, *args: Any) -> list[Any]:
        fn_index, n_inputs = self.endpoints[name]
        data = [*args, *[None] * (n_inputs - len(args))]  # gr.State inputs: the server keeps their values
        join = await self.http.post(f"{self.url}gradio_api/queue/join", json={
            "data": data, "fn_index": fn_index, "session_hash": self.session_hash, "event_data": None,
            "trigger_id": None})
        event_id = join.raise_for_status().json()["event_id"]
        async with self.http.stream("GET", f"{self.url}gradio_api/queue/data",
                                    params={"session_hash": self.session_hash}) as stream:
            async for line in stream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                    if not message.get("success"):
                        raise RuntimeError(str(message.get("output", {}).get("error")))
                    return message["output"]["data"]
        raise RuntimeError("the event stream closed without a result")


def client_sessions(url: str, owner_session: str, clients: int, poll_s: float, knob_every: int, stop: Any,
                    ready: Any, results: Any, snapshot_every: int = 10, page_poll_s: float = 0.75) -> None:
    """``clients`` sessions (:class:`PageSession`, one asyncio loop) polling like the page and turning
    knobs until ``stop``.

    Like the page, a session loads everything once (``/poll``), then on every tick asks what changed
    (``/watch``) and fetches the renders and plots (``/draw``) when a new snapshot is out (every
    ``snapshot_every`` steps of the status line). The first session speaks as ``owner_session`` (the
    session that started the run); the others are new sessions that watch. Runs in a thread or in
    another process; puts ``{"latencies", "errors", "refused"}`` on ``results``. A session follows the
    timer interval the server gives its page (a watching session polls less often), scaled by
    ``poll_s / page_poll_s``.
    """
    import httpx

    latencies: dict[str, list[float]] = {"poll": [], "watch": [], "draw": [], "set_cfg": [], "set_lr_scale": []}
    errors: list[str] = []
    refused = [0]

    async def session(page: PageSession, index: int) -> None:
        i, drawn_step, interval = 0, -snapshot_every, poll_s
        while not stop.is_set():
            i += 1
            calls: list[tuple[str, tuple]] = [("poll", ())] if i == 1 else [("watch", ())]  # first: the page load
            if i % knob_every == 0:
                k = i // knob_every
                calls.append(("set_cfg", (50.0 + (k % 7) * 10,)) if k % 2 else
                             ("set_lr_scale", (1.0 - 0.1 * (k % 4 == 0),)))
            for name, args in calls:  # a draw found necessary by a watch is appended and runs next
                t0 = time.perf_counter()
                try:
                    out = await page.call(name, *args)
                except Exception as err:  # noqa: BLE001 - every failure is a finding of the load test
                    errors.append(f"{name}: {type(err).__name__}: {err}")
                    continue
                latencies[name].append(time.perf_counter() - t0)
                if name == "watch":
                    # The server sets the page's timer: slower for a session that watches another's run.
                    interval = next((o["value"] * poll_s / page_poll_s for o in out if isinstance(o, dict)
                                     and o.get("__type__") == "update" and isinstance(o.get("value"), (int, float))),
                                    interval)
                    found = STEP.search(str(out[0]))
                    if found and int(found.group(1)) >= drawn_step + snapshot_every:
                        drawn_step = int(found.group(1))
                        calls.append(("draw", ()))
                elif name.startswith("set_"):
                    if "another session" in str(out[0]):
                        refused[0] += 1
                    elif index == 0 and "set to" not in str(out[0]):
                        errors.append(f"{name}: unexpected answer {out[0]!r}")
            await asyncio.sleep(interval)

    async def main() -> None:
        limits = httpx.Limits(max_connections=4 * clients)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            endpoints = await PageSession.endpoints_of(http, url)
            hashes = [owner_session] + [uuid.uuid4().hex for _ in range(clients - 1)]
            pages = [PageSession(http, url, h, endpoints) for h in hashes]
            ready.set()
            await asyncio.gather(*(session(p, i) for i, p in enumerate(pages)))

    asyncio.run(main())
    results.put({"latencies": latencies, "errors": errors, "refused": refused[0]})


def run_load_test(
    clients: int = 10, seconds: float = 30.0, poll_s: float = 0.75, knob_every: int = 3, warmup_s: float = 60.0,
    prior_factory: Any = None, run: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
    clients_in_process: bool = False,
) -> dict[str, Any]:
    """The measurement; ``prior_factory``, ``run`` and ``overrides`` let a test use a tiny prior."""
    from gradio_client import Client

    from app.jobs import JobManager
    from app.ui import AppSettings, build_demo, launch_local

    memory = PeakMemory(torch.device("cpu")).__enter__()  # the app's resident memory, run and server together
    manager = JobManager(prior_factory=prior_factory) if prior_factory else JobManager()
    settings = AppSettings(run_overrides=overrides or {})
    demo = build_demo(manager, settings)
    url = launch_local(demo)
    owner = None
    try:
        owner = Client(url, verbose=False)  # starts the run, and keeps its session's heartbeat open
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
        before = _rate(job.trainer, seconds)

        changes_before = len(job.trainer.knob_changes)
        if clients_in_process:  # the clients share the server's process (and its GIL)
            stop, ready, results = threading.Event(), threading.Event(), queue.Queue()
        else:  # like real browsers: the clients run elsewhere (here: another process on the same cores)
            ctx = multiprocessing.get_context("spawn")
            stop, ready, results = ctx.Event(), ctx.Event(), ctx.Queue()
        args = (url, owner.session_hash, clients, poll_s, knob_every, stop, ready, results, 10,
                settings.poll_seconds)
        worker: Any = (threading.Thread(target=client_sessions, args=args, daemon=True) if clients_in_process
                       else ctx.Process(target=client_sessions, args=args, daemon=True))
        worker.start()
        if not ready.wait(120):
            raise RuntimeError("the client sessions did not connect")
        time.sleep(2.0)  # every session has polled once
        server_cpu, client_cpu = _cpu_seconds(os.getpid()), _cpu_seconds(getattr(worker, "pid", None))
        loaded = _rate(job.trainer, seconds)
        server_cpu = (_cpu_seconds(os.getpid()) - server_cpu) / seconds
        client_cpu = (_cpu_seconds(getattr(worker, "pid", None)) - client_cpu) / seconds
        stop.set()
        outcome = results.get(timeout=120)
        worker.join(30)
        # A Gaussian-splat run slows as it densifies: bracket the loaded window between two quiet ones.
        time.sleep(2.0)
        after = _rate(job.trainer, seconds)
        alone = (before + after) / 2
        latencies, errors, refused = outcome["latencies"], outcome["errors"], [outcome["refused"]]
        every = [x for v in latencies.values() for x in v]
        report = {
            "clients": clients,
            "seconds": seconds,
            "poll_s": poll_s,
            "clients_run_in": "the server's process" if clients_in_process else "a separate process",
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
            "cores_used_by_app": server_cpu,  # training + server (+ the clients when in-process)
            "cores_used_by_clients": client_cpu,
            "it_per_s_alone": alone,
            "it_per_s_alone_before_and_after": [before, after],
            "it_per_s_loaded": loaded,
            "slowdown": 1 - loaded / alone if alone > 0 else float("nan"),
            "peak_rss_mb_app": memory.peak_mb,
        }
        return report
    finally:
        if owner is not None:
            try:
                owner.close()
            except Exception:  # noqa: BLE001
                pass
        manager.shutdown()
        demo.close()
        memory.__exit__(None, None, None)


def main(argv: list[str] | None = None) -> int:
    from lods.export import print_and_save_json

    p = argparse.ArgumentParser(prog="python -m benchmarks.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--seconds", type=float, default=30.0, help="length of each measurement window")
    p.add_argument("--poll", type=float, default=0.75, help="seconds between a session's polls (the page: 0.75)")
    p.add_argument("--clients-in-process", action="store_true",
                   help="run the client threads inside the server's process (they then compete for its GIL)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    report = run_load_test(clients=args.clients, seconds=args.seconds, poll_s=args.poll,
                           clients_in_process=args.clients_in_process)
    print_and_save_json(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
