"""The live 3D viewer: a viser server that shows the scene a run is optimizing.

Two ways to show a scene, following the nerfview / nerfstudio viewer:

* Gaussian splats are streamed. :meth:`ViewerServer.update` takes the trainer's latest
  :class:`~lods.trainer.Snapshot` and returns at once; a small sender thread keeps only the newest
  one and sends it at most ``max_updates_per_s`` times a second, so the training thread never
  waits on the network and stale snapshots are dropped rather than queued.
* A NeRF is rendered on the server. :meth:`ViewerServer.set_render_fn` installs a
  ``render_fn(c2w, fovy_rad, width, height) -> (H, W, 3) uint8`` callback; each browser gets its
  own render thread that draws a small image while the camera moves and a full-size one once the
  camera has rested for ``rest_s`` seconds, under the lock shared with training.

Coordinates are the project's (``lods.cameras``): world y up, the object at the origin, cameras in
OpenCV axes (x right, y down, z forward), which is also viser's camera convention.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import viser
import viser.transforms as vtf

from viewer.ply import with_pixel_filter

log = logging.getLogger(__name__)

RenderFn = Callable[[np.ndarray, float, int, int], np.ndarray]

# (azimuth, elevation) in degrees, as in lods.cameras.orbit: azimuth 0 looks at the object's front.
CAMERA_PRESETS: dict[str, tuple[float, float]] = {
    "Front": (0.0, 15.0),
    "Side": (90.0, 15.0),
    "Back": (180.0, 15.0),
    "Top": (0.0, 89.0),
}


def orbit_position(azimuth_deg: float, elevation_deg: float, distance: float) -> np.ndarray:
    """A point on the sphere around the origin, in the same convention as ``lods.cameras.orbit``."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return distance * np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])


class ViewerServer:
    """A viser server showing one run's scene, its camera presets and an axes/grid toggle.

    Args:
        host: Interface to bind; ``127.0.0.1`` keeps the viewer local, ``0.0.0.0`` shares it.
        port: Port to try first; when it is busy viser takes the next free one (see :attr:`port`).
        max_updates_per_s: At most this many splat updates are sent per second.
        low_res: Long side in pixels of NeRF renders while the camera moves.
        high_res: Upper bound on the long side of NeRF renders at rest (the browser's canvas size
            is used when smaller).
        rest_s: Seconds without camera motion before the full-size render.
        scene_render_interval_s: Least time between re-renders of a resting view caused by the
            scene changing (training progress), so that rendering does not starve training.
        ground_y: Height of the ground grid (the toy world's ground is at y = -0.5).
        camera_distance: Distance of the camera presets from the origin.
        fov_deg: Vertical field of view that clients start with.
        label: Title shown in the viewer's control panel.
        pixel_variance: World-space variance added to every splat's covariance: the training views'
            pixel filter (``lods.export.run_pixel_variance``), without which a scene trained at low
            resolution looks paler and more transparent here than in its own renders. Set it per run.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        max_updates_per_s: float = 10.0,
        low_res: int = 96,
        high_res: int = 512,
        rest_s: float = 0.2,
        scene_render_interval_s: float = 1.0,
        ground_y: float = -0.5,
        camera_distance: float = 3.2,
        fov_deg: float = 45.0,
        label: str = "LODS Studio",
        pixel_variance: float = 0.0,
    ) -> None:
        if max_updates_per_s <= 0:
            raise ValueError(f"max_updates_per_s must be positive, got {max_updates_per_s}")
        self.host = host
        self.min_interval_s = 1.0 / max_updates_per_s
        self.low_res, self.high_res, self.rest_s = low_res, high_res, rest_s
        self.scene_render_interval_s = scene_render_interval_s
        self.camera_distance = camera_distance
        self.pixel_variance = pixel_variance

        with contextlib.redirect_stdout(io.StringIO()):  # viser prints a banner of its own address: the
            # address to open is the app's page (or the line ``python -m viewer`` prints), not this one
            self.server = viser.ViserServer(host=host, port=port, label=label, verbose=False)
        self.server.scene.set_up_direction("+y")
        self.server.initial_camera.position = tuple(orbit_position(*CAMERA_PRESETS["Front"], camera_distance))
        self.server.initial_camera.look_at = (0.0, 0.0, 0.0)
        self.server.initial_camera.fov = math.radians(fov_deg)

        self._splats: Any = None  # viser GaussianSplatHandle once the first splats arrive
        self._mesh: Any = None
        self._scene_lock = threading.RLock()  # guards _splats and _mesh (sender thread vs. UI calls)
        self._render: tuple[RenderFn | None, Any] = (None, None)  # (render_fn, lock), swapped atomically
        self._views: dict[int, _ClientView] = {}
        self._retired: list[_ClientView] = []
        self._views_lock = threading.Lock()

        # Hand-off between update() (training thread) and the sender thread.
        self._cv = threading.Condition()
        self._pending: Any = None
        self._stopping = False
        self.updates_received = 0
        self.updates_sent = 0
        self.updates_dropped = 0
        self._sent_times: collections.deque[float] = collections.deque(maxlen=256)

        self._build_gui(ground_y)
        self.server.on_client_connect(self._on_connect)
        self.server.on_client_disconnect(self._on_disconnect)
        self._sender = threading.Thread(target=self._send_loop, name="viewer-splat-sender", daemon=True)
        self._sender.start()

    # ----------------------------------------------------------------------------- addresses
    @property
    def port(self) -> int:
        """The port actually bound (may differ from the one asked for)."""
        return self.server.get_port()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}/"

    # ----------------------------------------------------------------------------- streaming
    def update(self, snapshot: Any) -> None:
        """Hand over the newest snapshot (``.step``, ``.gaussians``); returns immediately.

        A snapshot not yet sent when a newer one arrives is dropped. ``.gaussians`` is None for a
        NeRF or image run; then a NeRF view at rest is re-rendered to show the progress.
        """
        with self._cv:
            if self._pending is not None:
                self.updates_dropped += 1
            self._pending = snapshot
            self.updates_received += 1
            self._cv.notify()

    def updates_per_second(self, window_s: float = 5.0) -> float:
        """Splat updates actually sent per second over the last ``window_s`` seconds."""
        now = time.monotonic()
        times = [t for t in list(self._sent_times) if now - t <= window_s]
        if len(times) < 2:
            return 0.0
        return (len(times) - 1) / max(times[-1] - times[0], 1e-9)

    def stats(self) -> dict[str, float]:
        """Counters for a status line: received, sent, dropped and sent per second."""
        return {
            "received": self.updates_received, "sent": self.updates_sent,
            "dropped": self.updates_dropped, "sent_per_s": self.updates_per_second(),
        }

    def show_gaussians(self, gaussians: dict[str, np.ndarray]) -> None:
        """Send Gaussians now (blocking): ``means`` (N, 3), ``covariances`` (N, 3, 3),
        ``rgbs`` (N, 3) in [0, 1], ``opacities`` (N, 1) in [0, 1]."""
        gaussians = with_pixel_filter(gaussians, self.pixel_variance)
        means = np.asarray(gaussians["means"], dtype=np.float32)
        n = len(means)
        covs = np.asarray(gaussians["covariances"], dtype=np.float32).reshape(n, 3, 3)
        rgbs = np.asarray(gaussians["rgbs"], dtype=np.float32).reshape(n, 3)
        opacities = np.asarray(gaussians["opacities"], dtype=np.float32).reshape(n, 1)
        with self._scene_lock, self.server.atomic():
            if self._splats is None:
                self._splats = self.server.scene.add_gaussian_splats(
                    "/scene/splats", centers=means, covariances=covs, rgbs=rgbs, opacities=opacities
                )
            else:
                self._splats.set_gaussians(means, covs, rgbs, opacities)
        self.updates_sent += 1
        self._sent_times.append(time.monotonic())

    def set_status(self, text: str) -> None:
        """Replace the status line at the top of the viewer's control panel (markdown)."""
        self._status.content = text

    def show_mesh(self, mesh: Any) -> None:
        """Show a ``trimesh.Trimesh`` (e.g. a finished NeRF's ``mesh.glb``), replacing any previous mesh."""
        with self._scene_lock:
            if self._mesh is not None:
                self._mesh.remove()
            self._mesh = self.server.scene.add_mesh_trimesh("/scene/mesh", mesh)

    def reset(self) -> None:
        """Forget the run: no renders from its trainer, no splats or mesh, status back to waiting."""
        self.set_render_fn(None)
        self.clear()
        self._status.content = "waiting for a run…"

    def clear(self) -> None:
        """Remove the splats, the mesh and every client's background render (e.g. before a new run)."""
        with self._cv:
            if self._pending is not None:
                self.updates_dropped += 1
                self._pending = None
        with self._scene_lock:
            if self._splats is not None:
                self._splats.remove()
                self._splats = None
            if self._mesh is not None:
                self._mesh.remove()
                self._mesh = None
        for view in self._live_views():
            view.clear_background()

    def _send_loop(self) -> None:
        next_send = 0.0
        while True:
            with self._cv:
                while not self._stopping and (self._pending is None or time.monotonic() < next_send):
                    timeout = None if self._pending is None else next_send - time.monotonic()
                    self._cv.wait(timeout)
                if self._stopping:
                    return
                snapshot, self._pending = self._pending, None
            next_send = time.monotonic() + self.min_interval_s
            try:
                self._publish(snapshot)
            except Exception:
                log.exception("viewer: could not send the scene of step %s", getattr(snapshot, "step", "?"))

    def _publish(self, snapshot: Any) -> None:
        gaussians = getattr(snapshot, "gaussians", None)
        with self._scene_lock:
            splats = gaussians is not None and self._render[0] is None
            if splats:
                self.show_gaussians(gaussians)
        steps = getattr(snapshot, "steps", None)
        status = f"step {snapshot.step}" + (f" / {steps}" if steps else "")
        if splats:
            status += f" · {len(gaussians['means']):,} splats · {self.updates_per_second():.1f} updates/s"
        elif self._render[0] is not None:
            for view in self._live_views():
                view.scene_changed()
        self._status.content = status

    # ----------------------------------------------------------------------------- NeRF renders
    def set_render_fn(self, render_fn: RenderFn | None, lock: Any = None) -> None:
        """Render the scene on the server for every browser, or stop doing so (``None``).

        ``render_fn(c2w (4, 4) OpenCV camera-to-world, fovy_rad, width, height)`` returns an
        (H, W, 3) uint8 image. ``lock`` (a ``threading.Lock``, or any context manager) is held
        around every call; pass the one the training step holds so renders never race it.
        Setting a render function hides streamed splats; clearing it removes the renders.
        """
        with self._scene_lock:
            self._render = (render_fn, lock)
            if render_fn is not None and self._splats is not None:
                self._splats.remove()
                self._splats = None
        for view in self._live_views():
            if render_fn is None:
                view.clear_background()
            else:
                view.scene_changed(force=True)

    # ----------------------------------------------------------------------------- GUI
    def _build_gui(self, ground_y: float) -> None:
        self._ground_y = ground_y
        self._status = self.server.gui.add_markdown("waiting for a run…")

    def _client_gui(self, client: viser.ClientHandle) -> None:
        """Each browser's own View buttons and helpers toggle: one viewer's clicks move no one else's camera."""
        views = client.gui.add_button_group("View", options=tuple(CAMERA_PRESETS))
        views.on_click(lambda event: self.move_cameras(event.target.value, client_id=client.client_id))
        helpers = client.gui.add_checkbox("Axes and grid", initial_value=True)
        grid = client.scene.add_grid(
            "/helpers/grid", width=4.0, height=4.0, plane="xz", cell_size=0.25, section_size=1.0,
            position=(0.0, self._ground_y, 0.0),
        )
        axes = client.scene.add_frame("/helpers/axes", axes_length=0.5, axes_radius=0.01)

        @helpers.on_update
        def _(_event: Any) -> None:
            grid.visible = axes.visible = helpers.value

    def move_cameras(self, preset: str, client_id: int | None = None) -> None:
        """Move a browser's camera (``client_id``; every browser's when None) to a preset: Front, Side, Back, Top."""
        if preset not in CAMERA_PRESETS:
            raise ValueError(f"unknown camera preset {preset!r}; choose one of {', '.join(CAMERA_PRESETS)}")
        position = orbit_position(*CAMERA_PRESETS[preset], self.camera_distance)
        for view in self._live_views():
            if not view.has_camera or (client_id is not None and view.client.client_id != client_id):
                continue
            camera = view.client.camera
            with view.client.atomic():
                camera.up_direction = (0.0, 1.0, 0.0)
                camera.position = position
                camera.look_at = (0.0, 0.0, 0.0)

    # ----------------------------------------------------------------------------- clients
    def _live_views(self) -> list[_ClientView]:
        with self._views_lock:
            return list(self._views.values())

    def _on_connect(self, client: viser.ClientHandle) -> None:
        view = _ClientView(client, self)
        with self._views_lock:
            if self._stopping:
                return
            self._views[client.client_id] = view
        self._client_gui(client)
        client.camera.on_update(lambda _camera: view.camera_moved())
        view.start()

    def _on_disconnect(self, client: viser.ClientHandle) -> None:
        with self._views_lock:
            view = self._views.pop(client.client_id, None)
            if view is not None:
                view.stop(wait=False)
                self._retired.append(view)

    # ----------------------------------------------------------------------------- shutdown
    def stop(self) -> None:
        """Stop the sender and render threads, then the viser server. Calling it again does nothing."""
        with self._cv:
            if self._stopping:
                return
            self._stopping = True
            self._cv.notify_all()
        with self._views_lock:
            views = list(self._views.values()) + self._retired
            self._views.clear()
            self._retired = []
        for view in views:
            view.stop(wait=False)
        self._sender.join(timeout=5.0)
        for view in views:
            view.stop(wait=True)
        with contextlib.redirect_stdout(io.StringIO()):  # viser's own "Server stopped"
            self.server.stop()

    def __enter__(self) -> ViewerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _ClientView:
    """One browser: its camera state and the thread that renders a NeRF for it."""

    def __init__(self, client: viser.ClientHandle, owner: ViewerServer) -> None:
        self.client = client
        self.owner = owner
        self.has_camera = False
        self._wake = threading.Condition()
        self._stopped = False
        self._camera_version = 0  # bumped on every camera message
        self._low_version = -1  # the camera version last drawn small
        self._full_version = -1  # the camera version last drawn full size
        self._moved_at = 0.0
        self._scene_dirty = False
        self._last_scene_render = -math.inf
        self._failing = False  # log a failing render_fn once, not on every camera move
        self._thread = threading.Thread(target=self._run, name=f"viewer-render-{client.client_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait: bool) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if wait and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)

    def camera_moved(self) -> None:
        with self._wake:
            self.has_camera = True
            self._camera_version += 1
            self._moved_at = time.monotonic()
            self._wake.notify()

    def scene_changed(self, force: bool = False) -> None:
        with self._wake:
            self._scene_dirty = True
            if force:
                self._last_scene_render = -math.inf
            self._wake.notify()

    def clear_background(self) -> None:
        self.client.scene.set_background_image(None)

    def _next_job(self) -> tuple[str | None, float | None]:
        """What to draw now ("low", "high" or None) and how long to sleep otherwise (None: until woken)."""
        if not self.has_camera or self.owner._render[0] is None:
            return None, None
        now = time.monotonic()
        if self._camera_version != self._full_version:
            rest_left = self._moved_at + self.owner.rest_s - now
            if rest_left > 0:
                if self._camera_version != self._low_version:
                    self._low_version = self._camera_version
                    return "low", None
                return None, rest_left
            self._full_version = self._low_version = self._camera_version
            self._scene_dirty = False
            self._last_scene_render = now
            return "high", None
        if self._scene_dirty:
            wait = self._last_scene_render + self.owner.scene_render_interval_s - now
            if wait > 0:
                return None, wait
            self._scene_dirty = False
            self._last_scene_render = now
            return "high", None
        return None, None

    def _run(self) -> None:
        while True:
            with self._wake:
                while True:
                    if self._stopped:
                        return
                    job, timeout = self._next_job()
                    if job is not None:
                        break
                    self._wake.wait(timeout)
            try:
                self._draw(high=job == "high")
                self._failing = False
            except Exception:
                if not self._failing:
                    log.exception("viewer: the render for client %d failed", self.client.client_id)
                self._failing = True

    def _draw(self, high: bool) -> None:
        render_fn, lock = self.owner._render
        if render_fn is None:
            return
        camera = self.client.camera
        c2w = np.eye(4)
        c2w[:3, :3] = vtf.SO3(np.asarray(camera.wxyz)).as_matrix()
        c2w[:3, 3] = camera.position
        canvas_w, canvas_h = camera.image_width, camera.image_height
        width, height = render_size(
            canvas_w / canvas_h if canvas_h > 0 else 1.0, self.owner.high_res if high else self.owner.low_res,
            max(canvas_w, canvas_h) if high else None,
        )
        with lock if lock is not None else nullcontext():
            image = render_fn(c2w, float(camera.fov), width, height)
        with self._wake:
            if self._stopped:
                return
        self.client.scene.set_background_image(
            np.asarray(image, dtype=np.uint8), format="jpeg", jpeg_quality=90 if high else 70
        )


def render_size(aspect: float, long_side: int, canvas_long_side: int | None = None) -> tuple[int, int]:
    """(width, height) with the given aspect ratio and long side, no larger than the canvas."""
    if canvas_long_side:
        long_side = min(long_side, canvas_long_side)
    aspect = aspect if aspect > 0 and math.isfinite(aspect) else 1.0
    if aspect >= 1.0:
        return long_side, max(1, round(long_side / aspect))
    return max(1, round(long_side * aspect)), long_side
