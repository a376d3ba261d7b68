"""The README's pictures of the lessons: the app on the toy prior, each lesson of the Compare tab run from its
preset on "a red cube" (seed 0) to its end in headless Chromium, and the tab's panes and table saved.

    python -m examples.screenshot_lessons --out docs [--lessons cfg-weight,...] [--chromium /usr/bin/chromium]

writes ``lesson-<name>.png`` per lesson (``lods.runs.lessons.LESSONS``) and prints each one's wall time.
"""

from __future__ import annotations

import time
from pathlib import Path

from app.compare_tab import COMPARE_PRESETS_SHOWN
from examples.shots import app_in_chromium, shot_parser
from lods.runs.lessons import LESSONS


def main() -> None:
    parser = shot_parser(__doc__, out_help="a folder")
    parser.add_argument("--lessons", default=",".join(LESSONS), help="comma-separated lesson names (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with app_in_chromium(args.chromium) as (_, page, url):
        page.goto(url)
        page.wait_for_selector("#start", timeout=60_000)
        page.get_by_role("tab", name="Compare").click()
        for name in args.lessons.split(","):
            page.locator("#compare-preset").get_by_label(COMPARE_PRESETS_SHOWN[name].label).check()
            time.sleep(2)  # the preset's slots, steps and backbone arrive
            t0 = time.perf_counter()
            page.locator("#compare-start").click()
            page.wait_for_selector("#compare-status :text('Running')", timeout=60_000)
            page.wait_for_selector("#compare-status :text('Done')", timeout=900_000)
            seconds = time.perf_counter() - t0
            time.sleep(3)  # the last panes and table
            top = page.locator("#compare-preset").bounding_box()
            bottom = page.locator("#compare-table").bounding_box()  # the panes and the table, not the files
            page.screenshot(path=str(out / f"lesson-{name}.png"), full_page=True,
                            clip={"x": 0, "y": top["y"] - 8, "width": 1400,
                                  "height": bottom["y"] + bottom["height"] - top["y"] + 16})
            print(f"{name}: {seconds:.0f} s from Start to Done", flush=True)


if __name__ == "__main__":
    main()
