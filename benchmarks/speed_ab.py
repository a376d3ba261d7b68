"""``python -m benchmarks.speed_ab --switch trace|early``: training steps per second with one CPU speed-up on
and off, in one run.

``trace``: the prior's UNet as a traced graph or the eager module (``prior.unet_call.trace``). ``early``:
LODS-embed's learned update started before the step's guidance, beside its UNet forwards, or after it
(``Trainer.update_early``). One trainer per backbone x method on the embedded prior (CPU, ``bench speed``'s
views per step); after 3 warm-up steps (the first traces the UNet) it trains blocks of ``--block`` steps,
switching on and off (on-off, off-on, ...), and reports the median rate of each. Both arms run in the same
process and the same minutes, so a machine whose speed drifts (a shared virtual machine) affects them alike,
and the run itself is the same either way (both switches leave every number bit-identical). Bare
``train_step`` calls: no preview renders, no events. A benchmark: it prints figures and writes them to
``--out``, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

SWITCHES = ("trace", "early")


def speed_ab(switch: str, backbones: list[str], methods: list[str], blocks: int = 4, block: int = 20,
             prior_name: str = "toy") -> list[dict[str, Any]]:
    import torch

    from lods.bench.speed import BACKBONE_BATCH
    from lods.config import RunConfig
    from lods.trainer import Trainer, load_prior

    prior = load_prior(prior_name, torch.device("cpu"))
    rows = []
    for backbone in backbones:
        for method in methods:
            config = RunConfig(prompt="a red cube", prior=prior_name, backbone=backbone, method=method, cfg=100.0,
                               steps=10**6, seed=0, device="cpu", batch=BACKBONE_BATCH[backbone], checkpoint_every=0)
            trainer = Trainer(config, prior=prior)
            try:
                for _ in range(3):
                    trainer.train_step()
                rates: dict[bool, list[float]] = {True: [], False: []}
                for i in range(blocks):
                    for on in ((True, False) if i % 2 == 0 else (False, True)):
                        if switch == "trace":
                            prior.unet_call.trace = on
                        else:
                            trainer.update_early = on
                        trainer.join_update()
                        t0 = time.perf_counter()
                        for _ in range(block):
                            trainer.train_step()
                        trainer.join_update()
                        rates[on].append(block / (time.perf_counter() - t0))
            finally:
                prior.unet_call.trace = True
                trainer.close()
            row = {"switch": switch, "backbone": backbone, "method": method, "traced": bool(prior.unet_call._graphs),
                   "on_it_s": statistics.median(rates[True]), "off_it_s": statistics.median(rates[False]),
                   "on_blocks": rates[True], "off_blocks": rates[False]}
            print(f"{backbone:6s} {method:12s} {switch} on {row['on_it_s']:6.2f} it/s   off {row['off_it_s']:6.2f} it/s"
                  f"   ({row['on_it_s'] / row['off_it_s'] - 1:+.0%})", flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--switch", choices=SWITCHES, default="trace")
    ap.add_argument("--backbones", default="image,gs,nerf")
    ap.add_argument("--methods", default="sds,lods-embed")
    ap.add_argument("--blocks", type=int, default=4, help="blocks per arm")
    ap.add_argument("--block", type=int, default=20, help="steps per block")
    ap.add_argument("--out", type=Path, default=None, help="a folder for <switch>-ab.json and <switch>-ab.md")
    args = ap.parse_args()
    rows = speed_ab(args.switch, args.backbones.split(","), args.methods.split(","), args.blocks, args.block)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.switch}-ab.json").write_text(json.dumps(rows, indent=2))
        arms = {"trace": ("traced", "eager"), "early": ("update beside the guidance", "update after it")}[args.switch]
        lines = [f"| backbone | method | {arms[0]}, it/s | {arms[1]}, it/s | change |",
                 "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {r['backbone']} | {r['method']} | {r['on_it_s']:.2f} | {r['off_it_s']:.2f} | "
                  f"{r['on_it_s'] / r['off_it_s'] - 1:+.0%} |" for r in rows]
        (args.out / f"{args.switch}-ab.md").write_text(
            f"`python -m benchmarks.speed_ab --switch {args.switch} --backbones {args.backbones} --methods "
            f"{args.methods} --blocks {args.blocks} --block {args.block}`: medians of {args.blocks} blocks of "
            f"{args.block} steps per arm, alternating, one process, toy prior, CPU (2 cores).\n\n"
            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
