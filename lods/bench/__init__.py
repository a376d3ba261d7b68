"""Benchmarks of the library: ``guidance`` (UNet passes and time per estimator), ``speed`` (time per phase,
peak memory) and ``quality`` (the paper's claims on the toy world). Whole-product benchmarks (the page under
load, the first render, the live viewer) live in the top-level ``benchmarks`` package."""
