"""Run every benchmark in one process tree and rewrite benchmarks/RESULTS.md.

    make bench        # or: .venv/bin/python benchmarks/run.py

Each benchmark script measures recovjax side by side with the PyTorch seed
loop in the same run and replaces its own section of RESULTS.md. Run it on
an otherwise idle machine: the figures are wall-clock times.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
SCRIPTS = ("bench_damage.py", "bench_sweep.py", "bench_recovery.py",
           "bench_memory.py", "bench_resnet.py", "bench_resnet_conv.py",
           "bench_faults.py", "bench_strategies.py")


def main() -> int:
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        code = subprocess.call([sys.executable, str(HERE / script), "--write"],
                               cwd=HERE.parent)
        if code:
            print(f"{script} failed with status {code}", file=sys.stderr)
            return code
    print(f"figures written to {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
