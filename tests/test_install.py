"""The README's install commands: CPU torch from PyTorch's CPU index, and CI calling the test command verbatim."""

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def requirement_lines(name: str) -> list[str]:
    """The lines of a requirements file with its ``-r`` includes expanded (as pip reads them)."""
    lines = []
    for raw in (ROOT / name).read_text().splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            lines += requirement_lines(line[3:].strip())
        else:
            lines.append(line)
    return lines


def readme_commands() -> list[str]:
    block = re.search(r"## Install and run.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def torch_pins(lines: list[str]) -> list[Requirement]:
    reqs = [Requirement(line) for line in lines if not line.startswith("-")]
    return [r for r in reqs if r.name == "torch"]


def test_cpu_and_test_installs_take_torch_from_the_cpu_index():
    for name in ("requirements-cpu.txt", "requirements-dev.txt"):
        lines = requirement_lines(name)
        assert f"--extra-index-url {CPU_INDEX}" in lines, name
        pins = [r for r in torch_pins(lines) if any(s.operator == "==" for s in r.specifier)]
        assert [str(r.specifier) for r in pins] == ["==2.13.0"], name
        # the CPU build's local version satisfies the pin (and pip ranks it above PyPI's CUDA build)
        assert all(r.specifier.contains("2.13.0+cpu") for r in torch_pins(lines)), name
        assert Version("2.13.0+cpu") > Version("2.13.0")
    # the runtime file alone stays free of the CPU index (the GPU command uses it)
    assert not any(line.startswith("--") for line in requirement_lines("requirements.txt"))


def test_readme_commands_and_ci():
    cpu, gpu, tests = readme_commands()
    assert cpu.startswith("pip install -r requirements-cpu.txt")
    assert gpu.startswith("pip install torch==2.13.0 -r requirements.txt")
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1] == tests  # CI runs the README's test command verbatim, last
    assert "pip install" not in ci.replace(tests, "")  # and installs nothing else with pip
