"""Whole-product benchmarks: ``python -m benchmarks.loadtest`` (many browser sessions on the page),
``python -m benchmarks.firstrender`` (seconds from Start to the first render), ``python -m benchmarks.viewer``
(splat updates reaching a browser while a run trains)."""
