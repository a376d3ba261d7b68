"""The example notebook runs top to bottom on the toy prior (CPU), through the public ``lods`` API."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(
        out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
        for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "done" in text and "lods-embed" in text
    images = [out for cell in nb.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(images) == 2  # the cube's turntable views; the image and its edit
    for run in ("cube", "sphere", "sphere-edit"):
        assert (tmp_path / "runs" / "notebook" / run / "summary.json").is_file(), run
    assert (tmp_path / "runs" / "notebook" / "cube" / "scene.ply").is_file()
