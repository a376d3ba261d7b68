"""The viewer: 3DGS .ply reading, splat streaming with throttling, NeRF renders, the one-port proxy."""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
import types
from contextlib import contextmanager

import numpy as np
import pytest

from viewer.ply import SH_C0, covariances_from_scales_quats, read_gaussians_ply
from viewer.server import ViewerServer, render_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gaussians(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 3, 3)).astype(np.float32) * 0.05
    return {
        "means": rng.normal(size=(n, 3)).astype(np.float32),
        "covariances": a @ a.transpose(0, 2, 1),
        "rgbs": rng.random((n, 3), dtype=np.float32),
        "opacities": rng.random((n, 1), dtype=np.float32),
    }


def snapshot(step: int, g: dict[str, np.ndarray] | None) -> types.SimpleNamespace:
    return types.SimpleNamespace(step=step, gaussians=g)


def wait_for(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@contextmanager
def no_new_threads():
    before = set(threading.enumerate())
    yield
    assert wait_for(lambda: not (set(threading.enumerate()) - before), timeout=10.0), [
        t.name for t in set(threading.enumerate()) - before
    ]


# ----------------------------------------------------------------------------------------- ply


def test_ply_round_trip_gives_expected_covariance(tmp_path):
    from lods.export import write_gaussians_ply

    s = np.array([[0.1, 0.2, 0.3], [0.05, 0.05, 0.4]])
    half = math.sqrt(0.5)
    # 90 degrees about z (maps x to y), given unnormalised to check normalisation; then the identity.
    quats = np.array([[2 * half, 0.0, 0.0, 2 * half], [1.0, 0.0, 0.0, 0.0]])
    f_dc = np.array([[0.0, 1.0, -1.0], [10.0, -10.0, 0.5]])
    logits = np.array([0.0, 2.0])
    # path, means, f_dc, f_rest (no higher SH degrees), opacity logits, log scales, wxyz quaternions
    path = write_gaussians_ply(
        tmp_path / "scene.ply", np.array([[1.0, 2.0, 3.0], [0.0, -0.5, 0.0]]), f_dc, np.zeros((2, 0)), logits,
        np.log(s), quats,
    )
    g = read_gaussians_ply(path)

    np.testing.assert_allclose(g["means"], [[1, 2, 3], [0, -0.5, 0]], atol=1e-6)
    np.testing.assert_allclose(g["covariances"][0], np.diag([0.2**2, 0.1**2, 0.3**2]), atol=1e-6)
    np.testing.assert_allclose(g["covariances"][1], np.diag(s[1] ** 2), atol=1e-6)
    np.testing.assert_allclose(g["rgbs"], np.clip(0.5 + SH_C0 * f_dc, 0, 1), atol=1e-6)
    np.testing.assert_allclose(g["opacities"][:, 0], 1 / (1 + np.exp(-logits)), atol=1e-6)
    assert g["opacities"].shape == (2, 1) and g["covariances"].dtype == np.float32


def test_covariance_matches_rotated_scales_for_random_gaussians():
    rng = np.random.default_rng(1)
    scales, quats = rng.uniform(0.01, 0.5, (64, 3)), rng.normal(size=(64, 4))
    cov = covariances_from_scales_quats(scales, quats)
    # Symmetric, positive definite, eigenvalues = squared scales.
    np.testing.assert_allclose(cov, cov.transpose(0, 2, 1), atol=1e-7)
    np.testing.assert_allclose(np.linalg.eigvalsh(cov), np.sort(scales**2, axis=1), rtol=1e-4, atol=1e-7)


def test_ply_without_gaussian_fields_is_rejected(tmp_path):
    from plyfile import PlyData, PlyElement

    data = np.zeros(3, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    PlyData([PlyElement.describe(data, "vertex")]).write(str(tmp_path / "points.ply"))
    with pytest.raises(ValueError, match="missing vertex properties"):
        read_gaussians_ply(tmp_path / "points.ply")


def test_cli_finds_the_result_file(tmp_path):
    from viewer.__main__ import find_result, main

    (tmp_path / "mesh.glb").write_bytes(b"")
    assert find_result(tmp_path) == tmp_path / "mesh.glb"
    (tmp_path / "scene.ply").write_bytes(b"")
    assert find_result(tmp_path) == tmp_path / "scene.ply"
    assert main([str(tmp_path / "missing")]) == 2


# ----------------------------------------------------------------------------------------- server


def test_server_streams_latest_snapshot_throttled_and_stops_cleanly():
    with no_new_threads():
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        viewer = ViewerServer(host="127.0.0.1", port=taken, max_updates_per_s=5.0)
        try:
            assert viewer.port != taken and viewer.url == f"http://127.0.0.1:{viewer.port}/"
            snaps = [snapshot(i, gaussians(10 + i, seed=i)) for i in range(40)]
            durations = []
            for s in snaps:
                t0 = time.perf_counter()
                viewer.update(s)
                durations.append(time.perf_counter() - t0)
            assert float(np.median(durations)) < 1e-3  # the caller never waits on the network
            settled = lambda: viewer.updates_sent + viewer.updates_dropped == viewer.updates_received
            assert wait_for(settled)
            assert viewer.updates_received == 40
            assert 1 <= viewer.updates_sent <= 3  # 40 updates in far less than a second at 5/s
            assert viewer._splats.buffer.shape[0] == 10 + 39  # the newest one was sent, stale ones dropped

            sent_before, t0 = viewer.updates_sent, time.monotonic()
            for i in range(40):
                viewer.update(snaps[i])
                time.sleep(0.02)
            assert wait_for(settled)
            sent = viewer.updates_sent - sent_before
            assert 2 <= sent <= 5.0 * (time.monotonic() - t0) + 1
            assert viewer.updates_dropped > 0
            assert 0 < viewer.updates_per_second() <= 5.0 * 1.25
        finally:
            viewer.stop()
            viewer.stop()  # a second stop is harmless
            busy.close()


def test_viewer_sends_splats_with_the_training_pixel_filter(capsys):
    g = gaussians(20, seed=4)
    var = 4e-4
    viewer = ViewerServer(host="127.0.0.1", port=free_port(), pixel_variance=var)
    try:
        viewer.show_gaussians(g)
        sent = viewer._splats.covariances  # what goes to the browser (float16 on the wire)
        np.testing.assert_allclose(sent, g["covariances"] + var * np.eye(3), rtol=2e-3, atol=1e-6)
        viewer.pixel_variance = 0.0
        viewer.show_gaussians(g)
        np.testing.assert_allclose(viewer._splats.covariances, g["covariances"], rtol=2e-3, atol=1e-6)
    finally:
        viewer.stop()
    assert "viser" not in capsys.readouterr().out  # no banner of its own address


def test_render_size_keeps_aspect_and_canvas_bound():
    assert render_size(1.5, 96) == (96, 64)
    assert render_size(0.5, 96) == (48, 96)
    assert render_size(2.0, 512, canvas_long_side=300) == (300, 150)


# ----------------------------------------------------------------------------------------- proxy + clients


@contextmanager
def serve_asgi(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, timeout=10.0)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10.0)
        sock.close()


def camera_message(position, look_at=(0.0, 0.0, 0.0), width=300, height=200) -> bytes:
    """The message a browser sends when its camera moves (viser's ViewerCameraMessage, msgpack)."""
    import msgspec
    import viser.transforms as vtf

    position, look_at = np.asarray(position, float), np.asarray(look_at, float)
    z = (look_at - position) / np.linalg.norm(look_at - position)
    x = np.cross(z, [0.0, 1.0, 0.0])  # right = forward x up, as in lods.cameras.look_at
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    wxyz = vtf.SO3.from_matrix(np.stack([x, y, z], axis=1)).wxyz
    return msgspec.msgpack.encode({
        "type": "ViewerCameraMessage", "wxyz": [float(v) for v in wxyz], "position": position.tolist(),
        "fov": math.radians(45.0), "near": 0.01, "far": 100.0, "image_height": height, "image_width": width,
        "look_at": look_at.tolist(), "up_direction": [0.0, 1.0, 0.0],
    })


def test_proxy_serves_page_and_relays_websocket_with_subprotocol():
    import httpx
    import viser
    import websockets
    from fastapi import FastAPI

    from viewer.proxy import mount_viewer

    with no_new_threads():
        viewer = ViewerServer(port=free_port(), rest_s=0.2)
        calls: list[tuple[np.ndarray, float, int, int]] = []
        lock = threading.Lock()

        def render_fn(c2w, fovy, width, height):
            assert lock.locked()
            calls.append((c2w, fovy, width, height))
            return np.full((height, width, 3), 200, np.uint8)

        app = FastAPI()

        @app.get("/{path:path}")  # a catch-all like a Gradio app mounted at "/"
        def other(path: str) -> dict:
            return {"app": path}

        assert mount_viewer(app, "/viewer", target_port=viewer.port) == "/viewer/"
        try:
            viewer.update(snapshot(1, gaussians(50)))
            with serve_asgi(app) as port:
                base = f"http://127.0.0.1:{port}"
                with httpx.Client(timeout=30.0) as http:
                    redirect = http.get(base + "/viewer?x=1", follow_redirects=False)
                    assert redirect.status_code == 307 and redirect.headers["location"].endswith("/viewer/?x=1")
                    page = http.get(base + "/viewer/")
                    direct = http.get(viewer.url)
                    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
                    assert page.content == direct.content and b'<div id="root">' in page.content
                    assert page.headers.get("content-encoding") == "gzip"  # relayed compressed
                    assert http.get(base + "/viewer/index.html").content == page.content
                    assert http.get(base + "/viewer/no-such-file.js").status_code == 404
                    assert http.get(base + "/elsewhere").json() == {"app": "elsewhere"}

                async def browser() -> tuple[str | None, int]:
                    async with websockets.connect(
                        f"ws://127.0.0.1:{port}/viewer", subprotocols=[f"viser-v{viser.__version__}"], max_size=None
                    ) as ws:
                        first = await asyncio.wait_for(ws.recv(), timeout=10)
                        assert isinstance(first, bytes) and len(first) > 0
                        viewer.set_render_fn(render_fn, lock)
                        for k in range(4):  # a short drag, then rest
                            await ws.send(camera_message((0.5 * k, 0.5, 3.0)))
                            await asyncio.sleep(0.03)
                        received = 0
                        end = time.monotonic() + 10
                        while time.monotonic() < end and not any(
                            w == 300 and abs(c2w[0, 3] - 1.5) < 1e-6 for c2w, _, w, _ in calls
                        ):
                            try:
                                await asyncio.wait_for(ws.recv(), timeout=0.2)
                                received += 1
                            except asyncio.TimeoutError:
                                pass
                        return ws.subprotocol, received

                subprotocol, received = asyncio.run(browser())
                assert subprotocol == f"viser-v{viser.__version__}"
                assert received > 0
                sizes = [(w, h) for _, _, w, h in calls]
                assert sizes[0] == (96, 64)  # small while moving
                assert sizes[-1] == (300, 200)  # full canvas size at rest
                c2w = calls[-1][0]
                np.testing.assert_allclose(c2w[:3, 3], [1.5, 0.5, 3.0], atol=1e-6)
                forward = c2w[:3, 2]
                np.testing.assert_allclose(forward, -c2w[:3, 3] / np.linalg.norm(c2w[:3, 3]), atol=1e-6)
                assert c2w[1, 1] < 0  # OpenCV: camera y points down, world y up
                assert math.isclose(calls[-1][1], math.radians(45.0), rel_tol=1e-6)

                async def wrong_protocol() -> None:
                    async with websockets.connect(f"ws://127.0.0.1:{port}/viewer", subprotocols=["nope"]) as ws:
                        await asyncio.wait_for(ws.recv(), timeout=10)

                with pytest.raises((websockets.ConnectionClosed, websockets.InvalidHandshake)):
                    asyncio.run(wrong_protocol())
        finally:
            viewer.stop()


def test_browser_page_connects_through_proxy():
    """The real viser client, loaded under the prefix, opens its WebSocket through the proxy."""
    from pathlib import Path

    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("needs /usr/bin/chromium")
    from fastapi import FastAPI

    from viewer.proxy import mount_viewer

    viewer = ViewerServer(port=free_port())
    app = FastAPI()
    mount_viewer(app, "/viewer", target_port=viewer.port)
    try:
        viewer.update(snapshot(3, gaussians(200)))
        with serve_asgi(app) as port, playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"],
            )
            try:
                page = browser.new_page(viewport={"width": 640, "height": 480})
                page.goto(f"http://127.0.0.1:{port}/viewer/")
                assert wait_for(lambda: len(viewer.server.get_clients()) == 1, timeout=30.0)
                assert wait_for(lambda: any(v.has_camera for v in viewer._live_views()), timeout=30.0)
                viewer.move_cameras("Side")
                view = viewer._live_views()[0]
                assert wait_for(lambda: view.client.camera.position[0] > 3.0, timeout=30.0)
            finally:
                browser.close()
    finally:
        viewer.stop()


def test_a_view_button_moves_only_the_camera_of_the_browser_that_pressed_it():
    from contextlib import nullcontext

    viewer = ViewerServer(port=free_port())
    try:
        views = {}
        for cid in (1, 2):
            camera = types.SimpleNamespace(position=(0.0, 0.0, 3.0), look_at=None, up_direction=None)
            client = types.SimpleNamespace(client_id=cid, camera=camera, atomic=nullcontext)
            views[cid] = types.SimpleNamespace(has_camera=True, client=client)
        viewer._views.update(views)
        viewer.move_cameras("Side", client_id=2)
        assert views[1].client.camera.position == (0.0, 0.0, 3.0)
        assert abs(views[2].client.camera.position[0]) > 3.0
        with pytest.raises(ValueError):
            viewer.move_cameras("Nowhere", client_id=1)
        viewer._views.clear()
    finally:
        viewer.stop()
