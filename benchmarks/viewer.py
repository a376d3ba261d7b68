"""``python -m benchmarks.viewer``: splat updates per second reaching a real browser while a run trains, and
how much the viewer slows the training.

Trains the same Gaussian-splat run twice on the default prior: alone, then with the viewer fed after
every step (``app.viewer_link.splat_feed``, throttled to the viewer's rate) and a headless Chromium
(Debian's ``/usr/bin/chromium``, driven by Playwright) showing it, or with ``--client websocket`` a
bare WebSocket client (the server's side alone). Splat updates are counted where they arrive: frames
larger than ``--frame-bytes`` (a splat buffer; status lines and camera messages are far smaller).
A benchmark: it prints figures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer(prior: Any, steps: int, seed: int = 0, method: str = "lods-embed"):
    from lods.config import RunConfig
    from lods.trainer import Trainer

    config = RunConfig(prompt="a red cube", backbone="gs", method=method, steps=steps, seed=seed, batch=2)
    return Trainer(config, prior=prior)


def _timed_run(trainer: Any, skip: int) -> float:
    """Iterations per second after the first ``skip`` steps (allocations, first densification)."""
    marks: dict[str, float] = {}

    def progress(step: int, total: int, stats: dict) -> None:
        if step == skip:
            marks["t0"] = time.perf_counter()

    trainer.run(progress)
    return (trainer.step - skip) / (time.perf_counter() - marks["t0"])


def run_viewer_bench(steps: int = 300, frame_bytes: int = 20_000, max_updates_per_s: float = 10.0,
                     prior: Any = None, client: str = "chromium", method: str = "lods-embed") -> dict[str, Any]:
    import torch

    from app.viewer_link import splat_feed
    from lods.trainer import load_prior
    from viewer.server import ViewerServer

    prior = prior or load_prior("toy", torch.device("cpu"))
    skip = min(20, steps // 5)
    alone = _timed_run(_trainer(prior, steps, method=method), skip)

    server = ViewerServer(port=_free_port(), max_updates_per_s=max_updates_per_s)
    frames: list[tuple[float, int]] = []
    result: dict[str, float] = {}
    trainer = _trainer(prior, steps, method=method)
    trainer.subscribe(splat_feed(server))
    worker = threading.Thread(target=lambda: result.update(rate=_timed_run(trainer, skip)))
    try:
        if client == "chromium":
            from playwright.sync_api import sync_playwright

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": 640, "height": 480})
                    page.on("websocket", lambda ws: ws.on(
                        "framereceived", lambda payload: frames.append((time.monotonic(), len(payload)))))
                    page.goto(server.url)
                    end = time.monotonic() + 60
                    while not server.server.get_clients() and time.monotonic() < end:
                        page.wait_for_timeout(100)
                    t0 = time.monotonic()
                    worker.start()
                    while worker.is_alive():
                        page.wait_for_timeout(100)  # lets Playwright deliver the frame events
                    t1 = time.monotonic()
                    page.wait_for_timeout(500)
                finally:
                    browser.close()
        else:  # a bare WebSocket client: the network side without a browser's rendering on this machine
            import viser
            from websockets.sync.client import connect

            stop = threading.Event()

            def receive() -> None:
                with connect(f"ws://127.0.0.1:{server.port}", subprotocols=[f"viser-v{viser.__version__}"],
                             max_size=None) as ws:
                    while not stop.is_set():
                        try:
                            msg = ws.recv(timeout=0.2)
                        except TimeoutError:
                            continue
                        frames.append((time.monotonic(), len(msg)))

            reader = threading.Thread(target=receive, daemon=True)
            reader.start()
            end = time.monotonic() + 60
            while not server.server.get_clients() and time.monotonic() < end:
                time.sleep(0.05)
            t0 = time.monotonic()
            worker.start()
            worker.join()
            t1 = time.monotonic()
            time.sleep(0.5)
            stop.set()
            reader.join(5)
    finally:
        server.stop()
    splat_frames = [t for t, n in frames if n >= frame_bytes and t0 <= t <= t1 + 0.5]
    with_viewer = result["rate"]
    return {
        "client": client,
        "method": method,
        "steps": steps,
        "splats": int(trainer.scene.means.shape[0]),
        "it_per_s_alone": alone,
        "it_per_s_with_viewer": with_viewer,
        "slowdown": 1 - with_viewer / alone,
        "splat_updates_received": len(splat_frames),
        "splat_updates_per_s": len(splat_frames) / (t1 - t0),
        "server_updates_sent": server.updates_sent,
        "max_updates_per_s": max_updates_per_s,
        "frame_bytes_threshold": frame_bytes,
        "largest_frame_bytes": max((n for _, n in frames), default=0),
    }


def main(argv: list[str] | None = None) -> int:
    from lods.export import print_and_save_json

    p = argparse.ArgumentParser(prog="python -m benchmarks.viewer", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--max-updates", type=float, default=10.0, help="the viewer's update cap per second")
    p.add_argument("--frame-bytes", type=int, default=20_000)
    p.add_argument("--client", choices=["chromium", "websocket"], default="chromium",
                   help="a headless browser rendering the splats (default), or a bare WebSocket client")
    p.add_argument("--method", default="lods-embed", help="the estimator of the Gaussian-splat run")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    if args.client == "chromium" and not Path(CHROMIUM).exists():
        raise SystemExit(f"needs Chromium at {CHROMIUM} (apt-get install -y chromium)")
    report = run_viewer_bench(args.steps, args.frame_bytes, args.max_updates, client=args.client,
                              method=args.method)
    print_and_save_json(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
