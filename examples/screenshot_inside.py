"""The screenshot of the "Inside one step" tab in the README: the app on the toy prior, a LODS-embed run at CFG
100 on "a red cube" (Gaussian splats), looked inside at t = 500 after ``--at`` steps, in headless Chromium.

    python -m examples.screenshot_inside --out docs/inside-one-step.png [--at 200] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import time

from examples.shots import app_in_chromium, run_until, shot_parser
from lods.config import RunConfig


def main() -> None:
    parser = shot_parser(__doc__)
    parser.add_argument("--at", type=int, default=200, help="look inside after this many steps")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    with app_in_chromium(args.chromium) as (jobs, page, url):
        config = RunConfig.from_dict(dict(prompt="a red cube", backbone="gs", method="lods-embed", cfg=100.0,
                                          steps=args.steps, seed=0))
        job = jobs.start_or_queue(config, owner="screenshot")
        run_until(jobs, job, lambda j: j.trainer is not None and j.trainer.step >= args.at)
        jobs.set_paused("screenshot", True)  # the plots and the look show the same step
        page.goto(url)
        page.get_by_role("tab", name="Inside one step").click()
        page.locator("#inside-look").click()
        page.wait_for_selector("#inside-images img", timeout=60_000)
        page.wait_for_selector("#inside-formula .katex", timeout=30_000)
        time.sleep(4)  # the plots' timer
        page.locator("#inside-tab").screenshot(path=args.out)


if __name__ == "__main__":
    main()
