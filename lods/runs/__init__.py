"""Run orchestration: one run (``generate``, ``edit``), the run folder every run writes (``folder``), and
runs of runs: ``compare`` (2 to 4 stepped in turn), ``sweep`` (methods x CFG weights) and ``batch`` (prompt lists,
resumable, optionally on Ray). Every entry point takes typed values; the CLI parses arguments into them."""

from lods.runs.folder import alignment_metrics, export_results, prepare_out, write_run_folder
from lods.runs.generation import PRESETS, edit, generate, load_image, run_and_export

__all__ = ["PRESETS", "alignment_metrics", "edit", "export_results", "generate", "load_image", "prepare_out",
           "run_and_export", "write_run_folder"]
