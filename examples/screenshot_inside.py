"""The screenshot of the "Inside one step" tab in the README: the app on the toy prior, a LODS-embed run at CFG
100 on "a red cube" (Gaussian splats), looked inside at t = 500 after ``--at`` steps, in headless Chromium.

    python -m examples.screenshot_inside --out docs/inside-one-step.png [--at 200] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import time

from app.jobs import JobManager
from app.ui import AppSettings, build_demo, launch_local
from lods.config import RunConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--at", type=int, default=200, help="look inside after this many steps")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    jobs = JobManager()
    demo = build_demo(jobs, AppSettings())
    url = launch_local(demo)
    try:
        config = RunConfig.from_dict(dict(prompt="a red cube", backbone="gs", method="lods-embed", cfg=100.0,
                                          steps=args.steps, seed=0))
        job = jobs.start_or_queue(config, owner="screenshot")
        while job.trainer is None or job.trainer.step < args.at:
            if not job.active:
                raise SystemExit(f"the run ended early: {job.phase} {job.message}")
            jobs.touch("screenshot")  # an owner that never polls counts as gone
            time.sleep(0.5)
        jobs.set_paused("screenshot", True)  # the plots and the look show the same step
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_role("tab", name="Inside one step").click()
            page.locator("#inside-look").click()
            page.wait_for_selector("#inside-images img", timeout=60_000)
            page.wait_for_selector("#inside-formula .katex", timeout=30_000)
            time.sleep(4)  # the plots' timer
            page.locator("#inside-tab").screenshot(path=args.out)
            browser.close()
    finally:
        jobs.shutdown()
        demo.close()


if __name__ == "__main__":
    main()
