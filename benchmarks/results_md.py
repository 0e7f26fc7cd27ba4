"""Sections of ``benchmarks/RESULTS.md``, one per benchmark script."""

from __future__ import annotations

import pathlib
import re

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")


def markers(name: str) -> tuple[str, str]:
    """The HTML comments that delimit section ``name``."""
    return f"<!-- begin {name} -->", f"<!-- end {name} -->"


def write_section(name: str, section: str,
                  path: pathlib.Path = RESULTS) -> None:
    """Replace the text between section ``name``'s markers, or append it."""
    begin, end = markers(name)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{section.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end),
                         re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def cpu_model() -> str:
    """The CPU's model name, as ``lscpu`` gives it."""
    import subprocess
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def run_fresh(script: str, arguments: list[str],
              environment: dict[str, str] | None = None) -> dict:
    """One measurement row in a fresh process: ``script --one ...``.

    The persistent compilation cache is off, so every row compiles (a hit
    in some rows only would skip the compiler's own memory there). The
    row is the JSON object the process prints last.

    Raises:
        RuntimeError: the process failed (its stderr is the message).
    """
    import json
    import os
    import subprocess
    import sys
    output = subprocess.run(
        [sys.executable, os.path.abspath(script), "--one", *arguments],
        capture_output=True, text=True,
        env=dict(os.environ, RECOVJAX_COMPILATION_CACHE="0",
                 **(environment or {})))
    if output.returncode:
        raise RuntimeError(output.stderr)
    return json.loads(output.stdout.strip().splitlines()[-1])
