"""``python -m lods sweep``: one prompt, several methods x CFG weights; one image grid and one table.

The paper's Fig. 5 (LODS-embed on NeRF, the initial CFG weight from 30 to infinity) is
``python -m lods sweep --prompt "a red cube" --backbone nerf --method lods-embed --cfg 30,100,1000,inf``.
Every cell is an ordinary ``generate`` run in ``OUT/<method>/cfg-<w>/``; finished cells are skipped.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import torch

from lods import export
from lods.errors import UserError
from lods.runs.batch import Job, is_done, run_all, run_job

TABLE_COLUMNS = ("method", "cfg", "alignment", "saturation", "value", "clipped", "floater_score", "seconds",
                 "it_per_s")


def parse_cfg_list(text: str) -> list[float]:
    """``"7.5,30,100,1000,inf"`` -> floats; every value must be a valid CFG weight (>= 1, inf allowed)."""
    from lods.config import check_cfg

    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            values.append(check_cfg(float(item)))
        except ValueError as err:
            raise UserError(f"--cfg expects comma-separated numbers (inf allowed), not {item!r}") from err
    if not values:
        raise UserError("--cfg lists no CFG weight")
    return values


def cfg_name(w: float) -> str:
    return "cfg-inf" if math.isinf(w) else f"cfg-{w:g}"


def sweep_jobs(base: dict[str, Any], methods: list[str], cfgs: list[float], out: Path) -> list[Job]:
    return [Job({**base, "method": m, "cfg": w}, str(out / m / cfg_name(w))) for m in methods for w in cfgs]


def _sweep_job(job: Job) -> dict[str, Any]:
    return run_job(job, video=False)


def cell_image(folder: Path) -> torch.Tensor:
    """The first view of a finished 3D run (or its image for 2D), (3, h, w) in [0, 1]."""
    import imageio.v2 as imageio

    if (folder / "image.png").exists():
        img = imageio.imread(folder / "image.png")[..., :3]
    else:
        img = export.read_views(folder / "views.png")[0]
    return torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255


def write_outputs(jobs: list[Job], methods: list[str], cfgs: list[float], out: Path) -> list[dict[str, Any]]:
    """``grid.png`` (one row per method, one column per CFG weight), ``table.csv`` and ``table.md``."""
    rows, cells = [], []
    size = None
    for job in jobs:
        folder = Path(job.out)
        if is_done(folder):
            s = json.loads((folder / "summary.json").read_text())
            rows.append({"method": s["method"], "cfg": job.config["cfg"], "seconds": s["seconds"],
                         "it_per_s": s["it_per_s"], **s.get("final_metrics", {})})
            img = cell_image(folder)
            size = img.shape[-1]
            cells.append(img)
        else:
            cells.append(None)
    if size is None:
        return rows
    cells = [c if c is not None else torch.ones(3, size, size) for c in cells]
    export.write_png(out / "grid.png", export.image_grid(torch.stack(cells), cols=len(cfgs)))
    with (out / "table.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    def num(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(num(r.get(k)) if k != "cfg" else f"{r['cfg']:g}" for k in TABLE_COLUMNS)
                     + " |")
    grid_note = f"grid.png: rows {', '.join(methods)}; columns CFG {', '.join(f'{w:g}' for w in cfgs)}"
    (out / "table.md").write_text("\n".join(lines) + "\n\n" + grid_note + "\n")
    return rows


def run_sweep(base: dict[str, Any], methods: list[str], cfgs: list[float], out: str | Path,
              executor: str = "sequential", ray_address: str | None = None) -> int:
    """Every method x CFG weight on the settings of ``base`` (plain config keys, with the prompt), one run folder
    each under ``out``; cells that cannot run (SDS at an infinite weight) are skipped. Writes ``grid.png`` and
    the tables; returns 1 when a run failed or none finished, else 0."""
    from lods.config import RunConfig
    from lods.runs.folder import prepare_out

    base = {**base, "method": methods[0], "cfg": cfgs[0]}
    RunConfig.from_dict(dict(base)).validate()
    out = prepare_out(out)
    jobs = sweep_jobs(base, methods, cfgs, out)
    todo = []
    for job in jobs:
        try:
            RunConfig.from_dict(dict(job.config)).validate()
        except UserError as err:  # e.g. SDS at an infinite weight: an empty cell, the rest still runs
            print(f"skipped: {job.config['method']} at CFG {job.config['cfg']:g}: {err}")
            continue
        if not is_done(job.out):
            todo.append(job)
    print(f"sweep: {len(jobs)} cells ({len(methods)} methods x {len(cfgs)} CFG weights), {len(todo)} to run")
    failed = run_all(_sweep_job, todo, executor, ray_address, "sweep",
                     lambda job: f"{job.config['method']} at CFG {job.config['cfg']:g}")
    rows = write_outputs(jobs, methods, cfgs, out)
    if rows:
        print((out / "table.md").read_text())
    return 1 if failed or not rows else 0
