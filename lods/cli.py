"""Implementations of the command-line subcommands (argument parsing lives in ``__main__``)."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

from lods.errors import UserError


def run(args: argparse.Namespace) -> int:
    """Parsed arguments stop here: each subcommand becomes a call of a library function with typed values."""
    return {"generate": _generate, "edit": _generate, "sweep": _sweep, "batch": _batch, "bench": _bench,
            "toy-prior": _toy_prior, "inside": _inside}[args.command](args)


def _inside(args: argparse.Namespace) -> int:
    from lods.inside import load_trainer, look_inside

    trainer = load_trainer(args.checkpoint)
    try:
        inside = look_inside(trainer, t=args.t, view=args.view - 1, seed=args.seed)
    finally:
        trainer.close()
    paths = inside.write(args.out)
    print(json.dumps({"step": inside.step, "t": inside.t, "cfg": inside.cfg, **inside.parts}, default=float))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from lods.config import RunConfig
    from lods.runs import edit, generate

    if getattr(args, "image", None) and args.command == "generate":
        from lods.runs.image3d import generate_from_image

        if args.resume:
            raise UserError("--resume is for text-to-3D runs; start image-to-3D runs afresh")
        generate_from_image(config_dict(args), args.image, args.out)
        return 0
    if args.command == "generate" and not args.resume and not (args.prompt or "").strip():
        raise UserError("the prompt is empty: pass --prompt TEXT (or --image IN.png for image to 3D)")
    config = RunConfig.from_dict(config_dict(args))
    if args.command == "edit":
        edit(config, args.image, args.out)
    else:
        generate(config, args.out, resume=args.resume)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from lods.runs.batch import parse_methods
    from lods.runs.sweep import parse_cfg_list, run_sweep

    cfgs = parse_cfg_list(args.cfg)
    methods = parse_methods(args.methods, default="lods-embed")
    args.method, args.cfg = methods[0], cfgs[0]
    return run_sweep(config_dict(args), methods, cfgs, args.out, args.executor, args.ray_address)


def _batch(args: argparse.Namespace) -> int:
    from lods.runs.batch import parse_methods, read_prompts, run_batch

    prompts = read_prompts(args.prompts)
    methods = parse_methods(args.methods)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    args.prompt, args.method, args.negative_prompt = prompts[0], methods[0], None
    return run_batch(prompts, methods, config_dict(args), args.out, args.executor, args.ray_address)


def config_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The run's config keys, later winning: ``--resume``'s checkpoint config, ``--config`` YAML, flags,
    ``--set``; then the backbone's preset fills what is still unset. ``--lr`` is the image's learning rate
    (2D) or a multiplier of every scene learning rate (3D)."""
    from lods.runs.generation import apply_sets, checkpoint_config, read_config_file, with_preset

    cfg: dict[str, Any] = {}
    if getattr(args, "resume", None):
        cfg.update(checkpoint_config(args.resume))
    if args.config:
        cfg.update(read_config_file(args.config))
    flags = {
        "prompt": args.prompt,
        "prior": args.prior,
        "method": getattr(args, "method", None),
        "cfg": args.cfg,
        "steps": args.steps,
        "seed": args.seed,
        "device": args.device,
        "learned_lr": args.learned_lr,
        "negative_prompt": args.negative_prompt,
        "backbone": getattr(args, "backbone", None),
    }
    cfg.update({k: v for k, v in flags.items() if v is not None})
    if args.command == "edit":
        cfg.update(backbone="image", source_prompt=args.source_prompt)
        cfg.setdefault("method", "dds")
    apply_sets(cfg, args.set)
    if args.lr is not None:
        if cfg.get("backbone", "gs") == "image":
            cfg["lr"] = {**(cfg.get("lr") or {}), "image": args.lr}
        else:
            cfg["lr_scale"] = args.lr
    return with_preset(cfg)


def _bench(args: argparse.Namespace) -> int:
    if args.what == "quality":
        from lods.bench.quality import DEFAULT_STEPS, run_quality
        from lods.priors.diffusers_prior import judge_path

        if judge_path(args.prior) is None:
            raise UserError("`bench quality` measures against the toy world: it runs on --prior toy only")
        if not args.out:
            raise UserError("bench quality needs --out DIR")
        rows = run_quality(Path(args.out), args.quick, args.seeds or (1 if args.quick else 2),
                           args.steps or DEFAULT_STEPS, args.executor, args.ray_address, report_only=args.report_only,
                           plan_file=Path(args.plan) if args.plan else None)
        print((Path(args.out) / "report.md").read_text() if rows else "no run finished")
        return 0 if rows else 1
    if args.what == "gpu":
        from lods.bench.gpu import bench_device, run_gpu_bench

        bench_device(args.device, args.cpu_reference)  # no CUDA: say so first
        if not args.out:
            raise UserError("bench gpu needs --out DIR")
        report = run_gpu_bench(args.out, device=args.device, cpu_reference=args.cpu_reference,
                               steps=args.steps or 3, budget_s=args.budget)
        failed = any(c["status"] == "fail" for c in report["checks"]) or any("error" in r for r in report["timing"])
        return 1 if failed else 0
    if args.what == "lessons":
        from lods.bench.lessons import run_lessons

        if args.prior != "toy":
            raise UserError("`bench lessons` measures against the toy world: it runs on --prior toy only")
        if not args.out:
            raise UserError("bench lessons needs --out DIR")
        rows = run_lessons(Path(args.out), report_only=args.report_only)
        print((Path(args.out) / "report.md").read_text())
        return 0 if rows else 1
    if args.what == "image3d":
        from lods.bench.image3d import DEFAULT_STEPS as IMAGE3D_STEPS
        from lods.bench.image3d import run_image3d_bench

        if not args.out:
            raise UserError("bench image3d needs --out DIR")
        rows = run_image3d_bench(Path(args.out), args.quick, args.seeds or 1, args.steps or IMAGE3D_STEPS,
                                 report_only=args.report_only)
        print((Path(args.out) / "report.md").read_text() if rows else "no run finished")
        return 0 if rows else 1
    if args.what == "speed":
        from lods.bench.speed import run_speed

        backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
        methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
        second = None if args.second_thread is None else args.second_thread == "on"
        run_speed(args.prior, backbones, methods, steps=args.steps or 20, device=args.device, out=args.out,
                  second_thread=second)
        return 0
    from lods.bench.guidance import run_guidance_bench

    run_guidance_bench(args.prior, steps=args.steps or 5, out=args.out)
    return 0


def _toy_prior(args: argparse.Namespace) -> int:
    if args.toy_command == "render":
        from lods.priors.toy.data import render_cache

        render_cache(args.out, args.n, seed=args.seed)
        return 0
    if args.toy_command == "train":
        from lods.priors.toy.train import WEIGHTS_DIR, ToyTrainConfig, train

        cfg = ToyTrainConfig(
            cache=args.cache,
            work=args.work,
            out=args.out or str(WEIGHTS_DIR),
            vae_minutes=args.vae_minutes,
            decoder_minutes=args.decoder_minutes,
            unet_minutes=args.unet_minutes,
            unet_multi_fraction=args.unet_multi_fraction,
            unet_object_weight=args.unet_object_weight,
            unet_lr=args.unet_lr,
            unet_cycle_from=args.unet_cycle_from,
            threads=args.threads,
        )
        if not (math.isfinite(cfg.unet_lr) and cfg.unet_lr > 0):
            raise UserError(f"--unet-lr must be a positive number, not {cfg.unet_lr}")
        if not 0 <= cfg.unet_cycle_from < cfg.unet_minutes:
            raise UserError(
                f"--unet-cycle-from ({cfg.unet_cycle_from:g}) must be at least 0 and less than "
                f"--unet-minutes ({cfg.unet_minutes:g})"
            )
        if not list(Path(cfg.cache).glob("chunk_*.pt")):
            raise UserError(
                f"no rendered chunks in {cfg.cache}; run `python -m lods toy-prior render --out {cfg.cache}`"
            )
        print(f"saved the prior to {train(cfg)}")
        return 0
    if args.toy_command == "train-views":
        from lods.priors.toy.views import VIEWS_DIR, ViewTrainConfig, train_views

        cfg = ViewTrainConfig(out=args.out or str(VIEWS_DIR), work=args.work, steps=args.steps, scenes=args.scenes,
                              batch=args.batch, threads=args.threads)
        print(f"saved the view-conditioned prior to {train_views(cfg)}")
        return 0
    if args.toy_command == "views-report":
        from lods.priors.toy.views import VIEWS_DIR, report_views

        report = report_views(args.prior_dir or VIEWS_DIR, n_scenes=args.scenes, steps=args.steps,
                              guidance_scale=args.cfg, out=args.out)
        print(json.dumps(report["summary"], indent=2))
        return 0
    if args.toy_command == "world-image":
        from lods.runs.image3d import world_input

        path = world_input(args.out, args.index)
        print(f"wrote {path} and {path.with_suffix('.json')}: {json.loads(path.with_suffix('.json').read_text())}")
        return 0
    if args.toy_command == "sample":
        from lods.priors.toy.sample import load_pipeline, sample, save_samples

        if not args.prompt.strip():
            raise UserError("the prompt is empty")
        if args.n < 1 or args.steps < 1:
            raise UserError("--n and --steps must be at least 1")
        images = sample(load_pipeline(), [args.prompt] * args.n, seed=args.seed, steps=args.steps, cfg=args.cfg)
        save_samples(images, args.out)
        print(f"wrote {args.n} samples and grid.png to {args.out}")
        return 0
    if args.toy_command == "judge":
        return _judge(args)
    raise UserError(f"unknown toy-prior action {args.toy_command!r}")


def _judge(args: argparse.Namespace) -> int:
    from lods.priors.toy import judge as J
    from lods.priors.toy.data import load_cache, render_cache
    from lods.priors.toy.sample import load_pipeline, sample
    from lods.priors.toy.world import all_captions

    if args.train:
        paths = sorted(Path(args.cache).glob("chunk_*.pt"))
        if not paths:
            raise UserError(f"no rendered chunks in {args.cache}")
        out = args.judge_out or J.JUDGE_PATH
        J.train_judge(load_cache(paths), out=out, minutes=args.minutes, lr=args.lr, work_dir=args.work_dir,
                      init=J.load_judge() if args.init else None)
        judge = J.load_judge(out)
    else:
        judge = J.load_judge()
    test_dir = Path(args.cache).parent / "judge-test"
    report: dict = {"renders": J.evaluate_on_renders(judge, load_cache(render_cache(test_dir, 1024, seed=7)))}
    print("judge accuracy on held-out renders:", json.dumps(report["renders"]))
    pipe = load_pipeline(args.prior_dir) if args.prior_dir else load_pipeline()
    rng = random.Random(0)
    groups = {
        "single": all_captions("single", held_out=False),
        "surroundings": all_captions("surroundings", held_out=False),
        "multi": all_captions("multi", held_out=False),
        "held_out": all_captions("single", held_out=True) + all_captions("surroundings", held_out=True)[:6],
    }
    report["samples"] = {"cfg": args.cfg, "steps": args.steps, "fresh": bool(args.fresh)}
    # The captions every earlier choice between priors was judged on: 48 per group, drawn in this order.
    used = {name: rng.sample(caps, min(48, len(caps))) for name, caps in groups.items()}
    fresh_rng = random.Random(1)
    for name, caps in groups.items():
        if args.fresh:  # captions never used for a choice, and other noise
            pool = [c for c in caps if c not in set(used[name])]
            if not pool:
                report["samples"][name] = {"accuracy": None, "n": 0, "note": "every caption was used before"}
                print(f"samples judged right, {name}: no fresh caption (all {len(caps)} were used before)")
                continue
            caps = fresh_rng.sample(pool, min(args.captions_per_category, len(pool)))
        else:
            caps = used[name][: args.captions_per_category]
        prompts = [c for c in caps for _ in range(args.samples_per_caption)]
        images = sample(pipe, prompts, seed=2 if args.fresh else 1, steps=args.steps, cfg=args.cfg)
        right = J.judge_images(judge, images, prompts)["objects_right"]
        report["samples"][name] = {"accuracy": float(right.float().mean()), "n": len(prompts)}
        print(f"samples judged right, {name}: {float(right.float().mean()):.3f} of {len(prompts)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        J.save_report(report, args.out)
    return 0
