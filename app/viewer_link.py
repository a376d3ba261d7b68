"""The one place where the live 3D viewer (``viewer/``, a viser server) is wired into the app.

:func:`connect_viewer` starts the viewer, feeds it every snapshot the job manager publishes (the
splats of a Gaussian run), lets it render a NeRF run on the server from each browser's camera
(``Trainer.render_camera``), and returns a :class:`ViewerLink` whose :meth:`~ViewerLink.html` is
the page's 3D panel. With ``single_port`` (a Hugging Face Space) the viewer binds to loopback and
:meth:`~ViewerLink.mount` relays it under the Gradio server's own port at ``/viewer/``.
"""

from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass
from typing import Any

from app.jobs import JobManager
from lods.trainer import Snapshot

log = logging.getLogger(__name__)

FRAME_ID = "lods-viewer-frame"
PROXY_PREFIX = "/viewer"
# Points the iframe at the host the page itself was loaded from (the server may be bound to 0.0.0.0).
FRAME_JS = f"""() => {{
  const frame = document.getElementById("{FRAME_ID}");
  if (frame && frame.dataset.port) {{
    frame.src = `${{window.location.protocol}}//${{window.location.hostname}}:${{frame.dataset.port}}/`;
  }}
}}"""


@dataclass
class ViewerLink:
    server: Any  # viewer.server.ViewerServer
    single_port: bool

    def html(self) -> str:
        """The iframe of the 3D panel."""
        if self.single_port:
            src, port = PROXY_PREFIX + "/", ""
        else:
            src, port = self.server.url, f' data-port="{int(self.server.port)}"'
        return (f'<iframe id="{FRAME_ID}" src="{html.escape(src)}"{port} title="Live 3D viewer" '
                'style="width:100%;height:480px;border:0;border-radius:8px"></iframe>')

    def mount(self, fastapi_app: Any) -> None:
        """Relay the viewer under ``/viewer/`` of the launched Gradio app (single-port mode)."""
        from viewer.proxy import mount_viewer

        mount_viewer(fastapi_app, PROXY_PREFIX, target_port=self.server.port)

    def stop(self) -> None:
        self.server.stop()


def splat_feed(server: Any) -> Any:
    """A trainer subscriber handing the splats to ``server``: every snapshot, and between snapshots (too rare
    for a live splat view) a copy of the splats after a step (a few milliseconds for 5,000) whenever the
    viewer can send again, so that throttled steps cost a clock read. The one channel from a trainer to the
    viewer."""
    state = {"next": 0.0}

    def feed(event: Any) -> None:
        if event.kind == "snapshot":
            state["next"] = time.monotonic() + server.min_interval_s
            server.update(event.snapshot)
            return
        if event.kind != "step":
            return
        now = time.monotonic()
        if now < state["next"]:
            return
        state["next"] = now + server.min_interval_s
        trainer = event.trainer
        server.update(Snapshot(step=trainer.step, steps=trainer.config.steps, previews=None, history=[],
                               knob_changes=[], gaussians=trainer.scene.viewer_gaussians()))

    return feed


def _snapshots_to(server: Any) -> Any:
    """A trainer subscriber passing each snapshot to ``server`` (its step and status line)."""
    return lambda event: server.update(event.snapshot) if event.kind == "snapshot" else None


def connect_viewer(manager: JobManager, host: str, port: int, single_port: bool = False) -> ViewerLink | None:
    """Start the viser viewer and stream the manager's snapshots to it; None when ``viewer/`` cannot start."""
    try:
        from viewer.server import ViewerServer
    except ImportError as err:
        log.warning("live 3D viewer unavailable: %s", err)
        return None
    try:
        server = ViewerServer("127.0.0.1" if single_port else host, port)
    except OSError as err:
        log.warning("live 3D viewer could not start on port %d: %s", port, err)
        return None
    def follow(trainer: Any) -> None:
        server.clear()
        server.set_render_fn(trainer.render_camera if trainer.scene.live_view == "render" else None)
        if trainer.scene.live_view == "splats":
            from lods.export import run_pixel_variance

            server.pixel_variance = run_pixel_variance(trainer.resolution, trainer.config.camera)
        trainer.subscribe(splat_feed(server) if trainer.scene.live_view == "splats" else _snapshots_to(server))

    manager.add_trainer_listener(follow)
    manager.add_reset_listener(server.reset)  # a reset run leaves nothing in the viewer, for new clients too
    return ViewerLink(server=server, single_port=single_port)
