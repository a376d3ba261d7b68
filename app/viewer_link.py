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
from types import SimpleNamespace
from typing import Any

from app.jobs import JobManager

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
    """A trainer step listener handing the splats to ``server`` at most at its update rate.

    Snapshots (every ``snapshot_every`` steps, with preview renders) are too rare for a live splat
    view; between them this copies the splats (a few milliseconds for 5,000) only when the viewer can
    send again, so that throttled steps cost a clock read.
    """
    state = {"next": 0.0}

    def feed(trainer: Any) -> None:
        now = time.monotonic()
        if now < state["next"]:
            return
        state["next"] = now + server.min_interval_s
        server.update(SimpleNamespace(step=trainer.step, steps=trainer.config.steps,
                                      gaussians=trainer.scene.viewer_gaussians()))

    return feed


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
        server.set_render_fn(trainer.render_camera if trainer.config.backbone == "nerf" else None)
        if hasattr(trainer.scene, "viewer_gaussians"):
            from lods.export import run_pixel_variance

            server.pixel_variance = run_pixel_variance(trainer.resolution, trainer.config.camera)
            trainer.step_listeners.append(splat_feed(server))

    manager.add_listener(server.update)
    manager.add_trainer_listener(follow)
    return ViewerLink(server=server, single_port=single_port)
