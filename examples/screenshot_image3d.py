"""The README's picture of image to 3D on the page: the app on the toy prior, a LODS-embed run (CFG 100, Gaussian
splats) from one view of held-out world scene ``--scene``, shot in headless Chromium when it has trained
``--steps`` steps: the input and the world's true views above, the render at the input camera and the generated
novel views below.

    python -m examples.screenshot_image3d --out docs/image-to-3d.png [--scene 0] [--steps 120]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from examples.shots import app_in_chromium, run_until, shot_parser
from lods.config import RunConfig
from lods.runs.image3d import with_image, world_input


def main() -> None:
    parser = shot_parser(__doc__)
    parser.add_argument("--scene", type=int, default=0)
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    with app_in_chromium(args.chromium) as (jobs, page, url):
        image = world_input(Path(tempfile.mkdtemp(prefix="lods-shot-")) / "input.png", args.scene)
        config = with_image(RunConfig.from_dict(dict(prompt="", backbone="gs", method="lods-embed", cfg=100.0,
                                                     steps=args.steps, seed=0)), image)
        job = jobs.start_or_queue(config, owner="screenshot")
        run_until(jobs, job, lambda j: j.phase == "done")
        page.goto(url)
        page.wait_for_selector("#renders img", timeout=60_000)
        time.sleep(3)  # the timer's next draw
        status, renders = page.locator("#status").bounding_box(), page.locator("#renders").bounding_box()
        page.screenshot(path=args.out, clip={"x": renders["x"], "y": status["y"], "width": renders["width"],
                                             "height": renders["y"] + renders["height"] - status["y"]})


if __name__ == "__main__":
    main()
