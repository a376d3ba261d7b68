"""The live 3D viewer (viser): splat streaming, NeRF renders on camera move, and a one-port proxy.

``ViewerServer`` shows a run's scene; ``mount_viewer`` relays it under a Gradio/FastAPI app's own
port; ``read_gaussians_ply`` loads a finished ``scene.ply``; ``python -m viewer DIR`` opens a
finished result folder.
"""

from viewer.ply import read_gaussians_ply
from viewer.proxy import mount_viewer, viewer_routes
from viewer.server import CAMERA_PRESETS, ViewerServer

__all__ = ["CAMERA_PRESETS", "ViewerServer", "mount_viewer", "read_gaussians_ply", "viewer_routes"]
