"""``python -m benchmarks.firstrender``: seconds from pressing Start to the first render on the page.

Launches the app on a free loopback port with the default prior (no live viewer), opens it in a
headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright), presses Start with the
page's defaults (Gaussian splats, LODS-embed) and times the run's "Running" status and the first preview
image. A benchmark: it prints figures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"]


def run_first_render(backbone: str = "gs", timeout_s: float = 300.0) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    from app.jobs import JobManager
    from app.ui import AppSettings, build_demo, launch_local

    manager = JobManager()
    demo = build_demo(manager, AppSettings())
    url = launch_local(demo)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(url)
                page.wait_for_selector("#start", timeout=60_000)
                if backbone != "gs":
                    page.get_by_label({"nerf": "NeRF", "image": "2D image"}[backbone]).first.check()
                t0 = time.monotonic()
                page.locator("#start").click()
                page.wait_for_selector("#status :text('Running')", timeout=timeout_s * 1000)
                running = time.monotonic() - t0
                page.wait_for_selector("#renders img", timeout=timeout_s * 1000)
                first = time.monotonic() - t0
                return {"backbone": backbone, "prior": manager.current().config.prior,
                        "seconds_to_running": running, "seconds_to_first_render": first}
            finally:
                browser.close()
    finally:
        manager.shutdown()
        demo.close()


def main(argv: list[str] | None = None) -> int:
    from lods.export import print_and_save_json

    p = argparse.ArgumentParser(prog="python -m benchmarks.firstrender", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", choices=["gs", "nerf", "image"], default="gs")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    print_and_save_json(run_first_render(args.backbone), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
