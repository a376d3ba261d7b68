"""What the screenshot scripts share: their two common options, the app on the toy prior on a loopback port with a
headless Chromium page (not yet opened on it) in a 1400 x 1000 window, and waiting for a run as its owner."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from app.jobs import JobManager
from app.ui import AppSettings, build_demo, launch_local


def shot_parser(doc: str, out_help: str = "the PNG file to write") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    return parser


@contextmanager
def app_in_chromium(chromium: str) -> Iterator[tuple[JobManager, Any, str]]:
    """(the app's job manager, a Chromium page, the app's address); everything closed afterwards."""
    from playwright.sync_api import sync_playwright

    jobs = JobManager()
    demo = build_demo(jobs, AppSettings())
    url = launch_local(demo)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            try:
                yield jobs, browser.new_page(viewport={"width": 1400, "height": 1000}), url
            finally:
                browser.close()
    finally:
        jobs.shutdown()
        demo.close()


def run_until(jobs: JobManager, job: Any, reached: Callable[[Any], bool], owner: str = "screenshot") -> None:
    """Poll as ``owner`` (an owner that never polls counts as gone) until ``reached(job)``; exit with the run's
    phase and message where it ends before that."""
    while not reached(job):
        if not job.active:
            raise SystemExit(f"the run ended early: {job.phase} {job.message}")
        jobs.touch(owner)
        time.sleep(0.5)
