"""LODS Studio: ``python app.py`` serves the Gradio page and the live 3D viewer.

    python app.py [--host 127.0.0.1] [--port 7860] [--viewer-port 8080] [--prior toy]
                  [--allow-model ID_OR_DIR ...] [--single-port] [--no-viewer]

On localhost the page accepts any Hugging Face model id; bound to another interface or on a Hugging
Face Space (``SPACE_ID`` set) it offers only toy, sd21, ``--prior`` and the ``--allow-model`` ids.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping

from app.config import ModelPolicy, restricted_server
from app.jobs import JobManager
from app.ui import AppSettings, build_demo, launch_options
from app.viewer_link import FRAME_JS, connect_viewer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py", description="LODS Studio: the interactive text-to-3D app")
    parser.add_argument("--host", help="interface to bind (default 127.0.0.1; 0.0.0.0 on a Hugging Face Space "
                                       "or as GRADIO_SERVER_NAME says)")
    parser.add_argument("--port", type=int, help="port of the page (default GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--viewer-port", type=int, default=8080, help="port of the live 3D viewer (default 8080)")
    parser.add_argument("--prior", default="toy", help="the prior selected at start: toy, sd21, a hub id or a folder")
    parser.add_argument("--allow-model", action="append", default=[], metavar="ID_OR_DIR",
                        help="another model the page may offer (repeatable); the only way to use a local folder")
    parser.add_argument("--single-port", action="store_true",
                        help="serve the viewer under the page's port at /viewer/ (on by default on a Space)")
    parser.add_argument("--no-viewer", action="store_true", help="do not start the live 3D viewer")
    parser.add_argument("--max-steps", type=int, default=None,
                        help=f"most steps a run may ask for (default {LOCAL_MAX_STEPS:,} on localhost, "
                             f"{SHARED_MAX_STEPS:,} when strangers can reach the page)")
    return parser.parse_args(argv)


LOCAL_MAX_STEPS = 20_000
SHARED_MAX_STEPS = 5_000  # a shared deployment: no one session holds the device for hours


def server_host(arg: str | None, env: Mapping[str, str] = os.environ) -> str:
    return arg or env.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if env.get("SPACE_ID") else "127.0.0.1")


def server_port(arg: int | None, env: Mapping[str, str] = os.environ) -> int:
    return arg or int(env.get("GRADIO_SERVER_PORT") or 7860)


def page_url(local_url: str) -> str:
    """The address to open, as the last line of the terminal (0.0.0.0 is no address for a browser)."""
    return local_url.replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//127.0.0.1:")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "websockets"):  # every startup request and socket, at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    host, port = server_host(args.host), server_port(args.port)
    single_port = args.single_port or bool(os.environ.get("SPACE_ID"))
    policy = ModelPolicy.for_server(host, extra=[args.prior, *args.allow_model])
    manager = JobManager()
    viewer = None if args.no_viewer else connect_viewer(manager, host, args.viewer_port, single_port)
    max_steps = args.max_steps or (SHARED_MAX_STEPS if restricted_server(host) else LOCAL_MAX_STEPS)
    settings = AppSettings(policy=policy, default_prior=args.prior, viewer_html=viewer.html() if viewer else "",
                           max_steps=max_steps)
    demo = build_demo(manager, settings, on_load_js=FRAME_JS if viewer and not single_port else None)
    # SIGTERM (a service manager, a Space restarting) ends like Ctrl-C: the run stops and its folder goes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        fastapi_app, local_url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True,
                                                quiet=True, **launch_options())
        if viewer is not None and single_port:
            viewer.mount(fastapi_app)
        print(f"LODS Studio is running: open {page_url(local_url)} (Ctrl-C to quit)", flush=True)
        demo.block_thread()
    finally:
        manager.shutdown(timeout=10)
        if viewer is not None:
            viewer.stop()
        demo.close(verbose=False)
        print("LODS Studio stopped.", flush=True)


if __name__ == "__main__":
    main()
