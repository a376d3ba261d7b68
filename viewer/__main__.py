"""Open a finished result folder in the viewer: ``python -m viewer runs/my-run [--port 8080]``.

Shows ``scene.ply`` (a Gaussian-splat run) or else ``mesh.glb`` (a NeRF run) until Ctrl-C. A path
to one of those files works too.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from viewer.ply import read_gaussians_ply
from viewer.server import ViewerServer

RESULT_FILES = ("scene.ply", "mesh.glb")
DESCRIPTION = (
    "Open a finished LODS Studio result in the 3D viewer: scene.ply (a Gaussian-splat run) or else "
    "mesh.glb (a NeRF run), until Ctrl-C. A path to one of those files works too."
)


def pixel_variance_of(result: Path) -> float:
    """The pixel filter of the run that wrote ``result`` (``lods.export.run_pixel_variance``), from the
    ``config.yaml`` beside it: its resolution and cameras. 0 when there is no readable config."""
    import yaml

    from lods.export import run_pixel_variance

    path = result.parent / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text()) or {}
        resolution = config.get("resolution") or (64 if config.get("prior", "toy") == "toy" else 512)
        return run_pixel_variance(int(resolution), config.get("camera") or {})
    except (OSError, yaml.YAMLError, TypeError, ValueError, AttributeError):
        return 0.0


def find_result(path: Path) -> Path:
    """The file to show: ``path`` itself, or the first of ``RESULT_FILES`` inside the folder."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    for name in RESULT_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path} has neither {' nor '.join(RESULT_FILES)}; is it a finished 3D run?")


def load_result(path: Path):
    """The Gaussians of a ``.ply`` or the mesh of a ``.glb``; a ``ValueError`` (one line) for anything else."""
    suffix = path.suffix.lower()
    if suffix not in (".ply", ".glb"):
        raise ValueError(f"{path} is not a result file: give a run folder, a scene.ply or a mesh.glb")
    try:
        if suffix == ".ply":
            return read_gaussians_ply(path)
        import trimesh

        mesh = trimesh.load(str(path), force="mesh")
        if not hasattr(mesh, "faces") or len(mesh.faces) == 0:
            raise ValueError("no triangles in it")
        return mesh
    except ValueError as e:
        raise ValueError(f"{path} cannot be shown: {str(e).splitlines()[0][:160]}") from e
    except Exception as e:  # plyfile and trimesh raise their own errors on malformed files
        raise ValueError(f"{path} is damaged or not a {suffix[1:]} file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else 'unreadable'})") from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m viewer", description=DESCRIPTION)
    parser.add_argument("result", type=Path, help="a result folder (or its scene.ply / mesh.glb)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 to share on the network")
    parser.add_argument("--port", type=int, default=8080, help="port to try first (the next free one is used)")
    args = parser.parse_args(argv)

    try:
        path = find_result(args.result)
        shown = load_result(path)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    viewer = ViewerServer(host=args.host, port=args.port, label=f"LODS Studio: {path.parent.name or path.name}",
                          pixel_variance=pixel_variance_of(path))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop cleanly when a service manager ends us
    try:
        if isinstance(shown, dict):
            viewer.show_gaussians(shown)
            what = f"{len(shown['means']):,} Gaussians"
        else:
            viewer.show_mesh(shown)
            what = f"a mesh of {len(shown.faces):,} faces"
        viewer.set_status(f"{path.name}: {what}")
        print(f"Showing {what} from {path} at {viewer.url} (Ctrl-C to quit)")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        viewer.stop()


if __name__ == "__main__":
    sys.exit(main())
