"""The README's picture of image to 3D on the page: the app on the toy prior, a LODS-embed run (CFG 100, Gaussian
splats) from one view of held-out world scene ``--scene``, shot in headless Chromium when it has trained
``--steps`` steps: the input and the world's true views above, the render at the input camera and the generated
novel views below.

    python -m examples.screenshot_image3d --out docs/image-to-3d.png [--scene 0] [--steps 120]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from app.jobs import JobManager
from app.ui import AppSettings, build_demo, launch_local
from lods.config import RunConfig
from lods.runs.image3d import with_image, world_input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--scene", type=int, default=0)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    jobs = JobManager()
    demo = build_demo(jobs, AppSettings())
    url = launch_local(demo)
    try:
        image = world_input(Path(tempfile.mkdtemp(prefix="lods-shot-")) / "input.png", args.scene)
        config = with_image(RunConfig.from_dict(dict(prompt="", backbone="gs", method="lods-embed", cfg=100.0,
                                                     steps=args.steps, seed=0)), image)
        job = jobs.start_or_queue(config, owner="screenshot")
        while job.active:
            jobs.touch("screenshot")  # an owner that never polls counts as gone
            time.sleep(0.5)
        if job.phase != "done":
            raise SystemExit(f"the run ended early: {job.phase} {job.message}")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#renders img", timeout=60_000)
            time.sleep(3)  # the timer's next draw
            page.locator("#status").scroll_into_view_if_needed()
            box_s, box_r = page.locator("#status").bounding_box(), page.locator("#renders").bounding_box()
            page.screenshot(path=args.out, clip={"x": box_r["x"], "y": box_s["y"], "width": box_r["width"],
                                                 "height": box_r["y"] + box_r["height"] - box_s["y"]})
            browser.close()
    finally:
        jobs.shutdown()
        demo.close()


if __name__ == "__main__":
    main()
