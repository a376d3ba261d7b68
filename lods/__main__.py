"""Command line: ``python -m lods {generate,edit,sweep,bench,batch,inside,toy-prior} ...``.

Every failure the user can fix (bad input, missing weights) ends with a one-line ``error:`` message
and exit status 2; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from lods.errors import UserError


def _methods_help() -> str:
    """The estimators and what each learns, from their own metadata."""
    from lods.guidance import METHODS

    def one(name: str, cls) -> str:
        notes = [f"learns {cls.learns}"] if cls.learns else []
        notes += ["editing only"] if cls.edit_only else []
        notes += ["finite CFG only"] if cls.finite_cfg_only else []
        return f"{name} ({cls.label}{': ' + ', '.join(notes) if notes else ''})"

    return "; ".join(one(name, cls) for name, cls in METHODS.items())


class Parser(argparse.ArgumentParser):
    """argparse with its complaints as one ``error:`` line (exit status 2), like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _int_in(low: int, high: int | None = None, what: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high]; argparse turns the ValueError into one error line."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise ValueError(text)
        return value

    parse.__name__ = what or (f"whole number from {low:,}" + (f" to {high:,}" if high is not None else ""))
    return parse


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


_finite_float.__name__ = "finite number >= 0"
STEPS = _int_in(1, 10_000_000)
SEED = _int_in(0, 2**32 - 1)
COUNT = _int_in(1)


def _add_executor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", default="sequential", choices=["sequential", "ray"],
                   help="run one after the other here (default) or as Ray tasks (one GPU each where there are GPUs)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")


def _add_run_options(
    p: argparse.ArgumentParser,
    cfg_help: str = "classifier-free guidance weight w (inf allowed)",
    cfg_type: type = float,
    cfg_required: bool = False,
    method: bool = True,
) -> None:
    p.add_argument("--prior", default=None, help="toy (default), sd21, a diffusers hub id or a local folder")
    if method:
        p.add_argument("--method", default=None, help=_methods_help())
    p.add_argument("--cfg", type=cfg_type, default=None, required=cfg_required, help=cfg_help)
    p.add_argument("--steps", type=STEPS, default=None)
    p.add_argument("--seed", type=SEED, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate of the image (2D), or a multiplier of every scene learning rate (3D)",
    )
    p.add_argument("--learned-lr", type=float, default=None, help="learning rate of the null embedding or LoRA")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--config", default=None, help="YAML file with any of the config keys")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys (dotted for sections: lr.means=0.01 gaussians.max_points=8000)")
    p.add_argument("--out", required=True, help="output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m lods", description="LODS Studio: score-distillation text-to-3D.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="text to 3D (gs, nerf) or to an image (image); image to 3D with --image")
    g.add_argument("--prompt", default=None, help="the text (optional with --image on the toy prior: the judge "
                   "captions the input)")
    g.add_argument("--image", default=None, help="image to 3D: the input view (its alpha or its background "
                   "colour gives the mask; a world render's IN.json gives its camera and true views)")
    g.add_argument("--backbone", default=None, help="gs, nerf or image")
    g.add_argument("--resume", default=None, help="a previous run's folder to continue")
    _add_run_options(g)

    e = sub.add_parser("edit", help="text-guided 2D editing (DDS, LODS-embed, ...)")
    e.add_argument("--image", required=True)
    e.add_argument("--source-prompt", required=True)
    e.add_argument("--prompt", required=True)
    _add_run_options(e)

    sw = sub.add_parser("sweep", help="several methods x CFG weights on one prompt: one image grid, one table")
    sw.add_argument("--prompt", required=True)
    sw.add_argument("--methods", default=None, help="comma-separated methods (default: lods-embed)")
    sw.add_argument("--backbone", default=None, help="gs (default), nerf (the paper's Fig. 5) or image")
    _add_run_options(sw, cfg_help="comma-separated CFG weights, e.g. 7.5,30,100,1000,inf", cfg_type=str,
                     cfg_required=True, method=False)
    _add_executor_options(sw)

    ba = sub.add_parser("batch", help="many prompts x methods, one folder each, resumable, optionally on Ray")
    ba.add_argument("--prompts", required=True, help="a text file, one prompt per line (e.g. examples/prompts/)")
    ba.add_argument("--methods", required=True, help="comma-separated methods, e.g. sds,lods-embed")
    ba.add_argument("--backbone", default=None, help="gs (default), nerf or image")
    ba.add_argument("--limit", type=COUNT, default=None, help="only the first N prompts")
    _add_run_options(ba, method=False)
    _add_executor_options(ba)

    b = sub.add_parser(
        "bench",
        help="benchmarks: guidance (UNet passes per estimator), speed (time per phase), quality (the paper's claims), "
             "gpu (the CUDA paths against the CPU references, and the paper's settings timed on SD 2.1's "
             "architecture), lessons (the Compare tab's lessons on prompts they were not set on), "
             "image3d (Table 2 on the toy world)",
    )
    b.add_argument("what", choices=["guidance", "speed", "quality", "gpu", "lessons", "image3d"])
    b.add_argument("--prior", default="toy")
    b.add_argument("--steps", type=STEPS, default=None,
                   help="steps per measurement (guidance 5, speed 20, gpu 3) or per run (quality 300)")
    b.add_argument("--out", default=None, help="guidance: a JSON file; speed, quality, gpu, lessons: a folder")
    b.add_argument("--quick", action="store_true", help="quality: 3 prompts, 5 methods, 1 seed (about 15 min on CPU)")
    b.add_argument("--seeds", type=_int_in(1, 1000), default=None,
                   help="quality: seeds per prompt and method (default 2, quick 1)")
    b.add_argument("--report-only", action="store_true",
                   help="quality, lessons: write the report from the finished runs, run nothing")
    b.add_argument("--plan", default=None, help="quality: a JSON file of prompts, variants, seeds and steps to run")
    b.add_argument("--backbones", default="gs,nerf,image", help="speed: comma-separated backbones")
    b.add_argument("--methods", default=None, help="speed: comma-separated estimators (default: all)")
    b.add_argument("--device", default=None, help="speed: cpu or cuda (default: cuda when available); gpu: cuda[:N]")
    b.add_argument("--second-thread", choices=["on", "off"], default=None,
                   help="speed: the trainer's second CPU thread (default: on for the CPU, off on a GPU)")
    b.add_argument("--cpu-reference", action="store_true",
                   help="gpu: run only what runs without CUDA (the CPU references, the report on tiny models)")
    b.add_argument("--budget", type=_finite_float, default=420.0, metavar="SECONDS",
                   help="gpu: start no new check or timing after this many seconds (default 420)")
    _add_executor_options(b)

    ins = sub.add_parser("inside", help="inside one step of a saved run: one-step images and the parts of the update")
    ins.add_argument("--checkpoint", required=True, help="a run's checkpoint.safetensors (or its folder)")
    ins.add_argument("--t", type=_int_in(0, 999, "whole number from 0 to 999"), default=500, help="the timestep")
    ins.add_argument("--view", type=_int_in(1, 16), default=1, help="which preview view (1 = the first)")
    ins.add_argument("--seed", type=SEED, default=0, help="seed of the added noise")
    ins.add_argument("--out", required=True, help="folder for inside.png and parts.json")

    t = sub.add_parser("toy-prior", help="the embedded prior: render, train, sample, judge")
    tsub = t.add_subparsers(dest="toy_command", required=True, metavar="ACTION")
    tr = tsub.add_parser("render", help="render the toy world's training cache (resumable)")
    tr.add_argument("--out", default=".cache/toy-world")
    tr.add_argument("--n", type=COUNT, default=48 * 512)
    tr.add_argument("--seed", type=SEED, default=0)
    tt = tsub.add_parser("train", help="train the VAE, then the UNet and text encoder (resumable)")
    tt.add_argument("--cache", default=".cache/toy-world")
    tt.add_argument("--work", default=".cache/toy-train")
    tt.add_argument("--out", default=None, help="pipeline folder (default: the package's shipped weights)")
    tt.add_argument("--vae-minutes", type=_finite_float, default=12.0)
    tt.add_argument("--decoder-minutes", type=_finite_float, default=0.0,
                    help="then train the decoder alone on the frozen encoder's latents, two-object scenes oversampled")
    tt.add_argument("--unet-minutes", type=_finite_float, default=90.0)
    tt.add_argument("--unet-multi-fraction", type=_finite_float, default=0.0,
                    help="share of two-object scenes in each UNet batch (0: as they come)")
    tt.add_argument("--unet-object-weight", type=_finite_float, default=0.0,
                    help="extra UNet loss weight on latent pixels covered by an object (0: plain loss)")
    tt.add_argument("--unet-lr", type=float, default=4e-4, help="the UNet's peak learning rate")
    tt.add_argument("--unet-cycle-from", type=_finite_float, default=0.0, metavar="MINUTES",
                    help="start a new warm-up and cosine learning-rate cycle at this many minutes of UNet "
                         "training, to continue a finished run (0: one cycle)")
    tt.add_argument("--threads", type=_int_in(0, 1024), default=0, help="torch threads (0: torch's default)")
    tv = tsub.add_parser("train-views", help="train the view-conditioned prior on pairs of world renders (resumable)")
    tv.add_argument("--out", default=None, help="diffusers folder (default: the package's weights/views)")
    tv.add_argument("--work", default=".cache/toy-views", help="renders and checkpoints; a rerun resumes")
    tv.add_argument("--steps", type=_int_in(1, 10_000_000), default=2500)
    tv.add_argument("--scenes", type=_int_in(1, 1_000_000), default=2048, help="training scenes (4 views each)")
    tv.add_argument("--batch", type=_int_in(1, 4096), default=24)
    tv.add_argument("--threads", type=_int_in(1, 1024), default=1)
    tvr = tsub.add_parser("views-report", help="novel views of held-out scenes: judged right, PSNR vs true views")
    tvr.add_argument("--prior-dir", default=None, help="the view-conditioned prior (default: the shipped one)")
    tvr.add_argument("--scenes", type=_int_in(1, 100_000), default=36)
    tvr.add_argument("--steps", type=_int_in(1, 1000), default=25)
    tvr.add_argument("--cfg", type=_finite_float, default=3.0)
    tvr.add_argument("--out", required=True, help="folder for report.json and views.png")
    tw = tsub.add_parser("world-image", help="a held-out world render as an image-to-3D input (PNG + its JSON)")
    tw.add_argument("--index", type=_int_in(0, 1_000_000), default=0, help="scene of the held-out stream")
    tw.add_argument("--out", required=True, help="the PNG to write (its camera and scene go to the .json beside)")
    ts = tsub.add_parser("sample", help="DDIM samples of a prompt")
    ts.add_argument("--prompt", required=True)
    ts.add_argument("--n", type=_int_in(1, 4096), default=8)
    ts.add_argument("--seed", type=SEED, default=0)
    ts.add_argument("--steps", type=_int_in(1, 1000), default=50)
    ts.add_argument("--cfg", type=_finite_float, default=5.0)
    ts.add_argument("--out", required=True)
    tj = tsub.add_parser("judge", help="train the judge, or report its accuracy on renders and on samples")
    tj.add_argument("--train", action="store_true", help="train the judge on the render cache first")
    tj.add_argument("--cache", default=".cache/toy-world")
    tj.add_argument("--minutes", type=_finite_float, default=10.0)
    tj.add_argument("--init", action="store_true", help="continue from the shipped judge instead of from scratch")
    tj.add_argument("--lr", type=_finite_float, default=2e-3)
    tj.add_argument("--work-dir", default=None, help="checkpoint and fresh renders here; a rerun resumes")
    tj.add_argument("--judge-out", default=None, help="where --train writes the judge (default: the shipped file)")
    tj.add_argument("--prior-dir", default=None, help="sample from this pipeline folder (default: the shipped prior)")
    tj.add_argument("--samples-per-caption", type=_int_in(1, 1000), default=2)
    tj.add_argument("--captions-per-category", type=_int_in(1, 100_000), default=48)
    tj.add_argument("--cfg", type=_finite_float, default=5.0)
    tj.add_argument("--steps", type=_int_in(1, 1000), default=50)
    tj.add_argument("--fresh", action="store_true",
                    help="sample captions never used to choose between priors (and other noise)")
    tj.add_argument("--out", default=None, help="write the report as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from lods import cli

        return cli.run(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system said no: a full disk, a read-only folder, a missing file
        if args.debug:
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
