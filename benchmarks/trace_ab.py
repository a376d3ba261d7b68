"""``python -m benchmarks.trace_ab``: training steps per second with the traced UNet and with the eager one.

One trainer per backbone x method on the embedded prior (CPU); after 3 warm-up steps (and the UNet's
trace) it trains blocks of ``--block`` steps, switching ``prior.unet_call.trace`` on and off (on-off,
off-on, ...), and reports the median rate of each. Both arms run in the same process and the same minutes,
so a machine whose speed drifts (a shared virtual machine) affects them alike, and the run itself is the
same either way (the traced graph is bit-identical to the module). Bare ``train_step`` calls: no preview
renders, no events. A benchmark: it prints figures and writes them to ``--out``, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

BATCH = {"gs": 2, "nerf": 1, "image": 1}


def trace_ab(backbones: list[str], methods: list[str], blocks: int = 4, block: int = 20,
             prior_name: str = "toy") -> list[dict[str, Any]]:
    import torch

    from lods.config import RunConfig
    from lods.trainer import Trainer, load_prior

    prior = load_prior(prior_name, torch.device("cpu"))
    rows = []
    for backbone in backbones:
        for method in methods:
            config = RunConfig(prompt="a red cube", prior=prior_name, backbone=backbone, method=method, cfg=100.0,
                               steps=10**9, seed=0, device="cpu", batch=BATCH[backbone], checkpoint_every=0)
            trainer = Trainer(config, prior=prior)
            try:
                for _ in range(3):
                    trainer.train_step()
                prior.unet_call.wait()
                rates: dict[bool, list[float]] = {True: [], False: []}
                for i in range(blocks):
                    for traced in ((True, False) if i % 2 == 0 else (False, True)):
                        prior.unet_call.trace = traced
                        trainer.join_update()
                        t0 = time.perf_counter()
                        for _ in range(block):
                            trainer.train_step()
                        trainer.join_update()
                        rates[traced].append(block / (time.perf_counter() - t0))
            finally:
                prior.unet_call.trace = True
                trainer.close()
            row = {"backbone": backbone, "method": method, "traced": bool(prior.unet_call._graphs),
                   "traced_it_s": statistics.median(rates[True]),
                   "eager_it_s": statistics.median(rates[False]), "traced_blocks": rates[True],
                   "eager_blocks": rates[False]}
            print(f"{backbone:6s} {method:12s} traced {row['traced_it_s']:6.2f} it/s   eager {row['eager_it_s']:6.2f} "
                  f"it/s   ({row['traced_it_s'] / row['eager_it_s'] - 1:+.0%})", flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", default="image,gs,nerf")
    ap.add_argument("--methods", default="sds,lods-embed")
    ap.add_argument("--blocks", type=int, default=4, help="blocks per arm")
    ap.add_argument("--block", type=int, default=20, help="steps per block")
    ap.add_argument("--out", type=Path, default=None, help="a folder for trace-ab.json and trace-ab.md")
    args = ap.parse_args()
    rows = trace_ab(args.backbones.split(","), args.methods.split(","), args.blocks, args.block)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "trace-ab.json").write_text(json.dumps(rows, indent=2))
        lines = ["| backbone | method | traced it/s | eager it/s | change |", "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {r['backbone']} | {r['method']} | {r['traced_it_s']:.2f} | {r['eager_it_s']:.2f} | "
                  f"{r['traced_it_s'] / r['eager_it_s'] - 1:+.0%} |" for r in rows]
        (args.out / "trace-ab.md").write_text(
            f"`python -m benchmarks.trace_ab --blocks {args.blocks} --block {args.block}`: medians of "
            f"{args.blocks} blocks of {args.block} steps per arm, alternating, one process, toy prior, CPU.\n\n"
            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
