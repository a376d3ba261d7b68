"""Serve the viser viewer under another web app's port, for hosts that expose one port only.

On a Hugging Face Space only the Gradio server's port is reachable, so the viewer's page and its
WebSocket are relayed through the Gradio (FastAPI / Starlette) app under a path prefix:

* ``GET {prefix}/{path}`` is fetched from viser's HTTP server and returned as it is (still
  gzip-compressed when the browser accepted that). ``GET {prefix}`` redirects to ``{prefix}/`` so
  that relative URLs in the page resolve under the prefix.
* A WebSocket at ``{prefix}`` (or anything below it) is relayed to viser, message by message in
  both directions, with the browser's ``viser-v<version>`` subprotocol forwarded: viser closes any
  connection that does not offer it.

viser's client builds its WebSocket address from the page address: ``location.href`` with
``http`` swapped for ``ws``, the query dropped and a trailing slash removed. The page served at
``/viewer/`` therefore connects to ``ws://host/viewer``, which is why the bare prefix is a
WebSocket route too. (The client then writes ``?websocket=...`` into the address bar, because
the server address differs from the page's host; that is harmless.)
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import websockets
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

FORWARDED_REQUEST_HEADERS = ("accept", "accept-encoding", "accept-language", "user-agent")
FORWARDED_RESPONSE_HEADERS = ("content-type", "content-encoding", "cache-control", "etag", "last-modified")


def viewer_routes(prefix: str = "/viewer", target_port: int = 8080, target_host: str = "127.0.0.1") -> list[BaseRoute]:
    """The Starlette routes that relay ``prefix`` to the viser server at ``target_host:target_port``."""
    prefix = "/" + prefix.strip("/")
    if prefix == "/":
        raise ValueError("the viewer needs a path prefix such as '/viewer'")
    http_base = f"http://{target_host}:{target_port}"
    ws_url = f"ws://{target_host}:{target_port}"

    async def redirect(request: Request) -> Response:
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(request.url.path + "/" + query, status_code=307)

    async def http(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_REQUEST_HEADERS}
        url = f"{http_base}/{request.path_params['path']}"
        try:
            async with httpx.AsyncClient(timeout=30.0) as client:
                async with client.stream("GET", url, params=request.query_params, headers=headers) as upstream:
                    body = b"".join([chunk async for chunk in upstream.aiter_raw()])
        except httpx.HTTPError as e:
            return PlainTextResponse(f"the 3D viewer is not reachable at {http_base}: {e}", status_code=502)
        out = {k: v for k, v in upstream.headers.items() if k.lower() in FORWARDED_RESPONSE_HEADERS}
        return Response(body, status_code=upstream.status_code, headers=out)

    async def ws(websocket: WebSocket) -> None:
        offered = list(websocket.scope.get("subprotocols") or [])
        try:
            upstream = await websockets.connect(
                ws_url, subprotocols=offered or None, max_size=None, compression=None, open_timeout=10
            )
        except (OSError, TimeoutError, websockets.InvalidHandshake):
            await websocket.close(code=1011)
            return
        await websocket.accept(subprotocol=upstream.subprotocol)
        try:
            await relay(websocket, upstream)
        finally:
            await upstream.close()
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await websocket.close()

    return [
        Route(prefix, redirect, methods=["GET"]),
        Route(prefix + "/{path:path}", http, methods=["GET"]),
        WebSocketRoute(prefix, ws),
        WebSocketRoute(prefix + "/{path:path}", ws),
    ]


async def relay(browser: WebSocket, upstream: Any) -> None:
    """Copy messages both ways until either side closes."""

    async def browser_to_upstream() -> None:
        while True:
            message = await browser.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                data = message.get("text")
            if data is not None:
                await upstream.send(data)

    async def upstream_to_browser() -> None:
        async for data in upstream:
            if isinstance(data, bytes):
                await browser.send_bytes(data)
            else:
                await browser.send_text(data)

    tasks = [asyncio.create_task(browser_to_upstream()), asyncio.create_task(upstream_to_browser())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception) and not isinstance(
                result, (websockets.ConnectionClosed, WebSocketDisconnect, RuntimeError)
            ):
                raise result


def mount_viewer(app: Any, prefix: str = "/viewer", target_port: int = 8080, target_host: str = "127.0.0.1") -> str:
    """Relay the viser server at ``target_host:target_port`` under ``prefix`` of a FastAPI/Starlette app.

    The routes go first in ``app.router.routes``, so they take precedence over a Gradio app
    mounted at ``/`` and may be added before or after ``gr.mount_gradio_app`` or ``launch``.
    Returns the page's path (``prefix + "/"``), e.g. for an ``<iframe src=...>``.
    """
    routes = viewer_routes(prefix, target_port, target_host)
    app.router.routes[0:0] = routes
    return "/" + prefix.strip("/") + "/"
