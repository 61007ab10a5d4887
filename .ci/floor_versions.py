"""Print pip requirements pinning each dependency CI tests at its floor to the lowest version
pyproject.toml declares (``name>=X`` -> ``name==X``), so the floor in pyproject is the one tested."""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

FLOORED = ("transformers", "peft")


def floor_pins(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    pins = []
    for name in FLOORED:
        found = [r for r in requirements if re.match(rf"{name}\b", r)]
        lower = [m.group(1) for r in found for m in [re.search(r">=\s*([\w.]+)", r)] if m]
        if len(lower) != 1:
            sys.exit(f"{pyproject}: expected one '{name}>=X' requirement, found {found}")
        pins.append(f"{name}=={lower[0]}")
    return pins


if __name__ == "__main__":
    print(" ".join(floor_pins(Path(__file__).resolve().parents[1] / "pyproject.toml")))
