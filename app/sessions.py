"""Gradio plumbing shared by the tabs: who is asking (the session), Gradio's copies of served files, and
running quick callbacks on Gradio's event loop."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import gradio as gr


def cached_copies(paths: list[Path]) -> list[Path]:
    """The folders where Gradio keeps its served copies of ``paths`` (its cache names them by content hash)."""
    from gradio.processing_utils import hash_file
    from gradio.utils import get_upload_folder

    return [Path(get_upload_folder()) / hash_file(p) for p in paths if Path(p).is_file()]


def session_of(request: gr.Request | None) -> str:
    return (getattr(request, "session_hash", None) if request is not None else None) or "anonymous"


def on_event_loop(fn: Any) -> Any:
    """``fn`` as a coroutine function, so that Gradio calls it on its event loop instead of handing it to
    a worker thread: for the quick, non-blocking callbacks (the timer, the knobs), one thread hop and its
    interpreter-lock handoffs fewer per request, which the training thread feels."""

    @functools.wraps(fn)
    async def run(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return run
