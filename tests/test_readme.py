"""The README's Python tour runs as written."""

from __future__ import annotations

import pathlib
import re

from recovjax.checkpoints import save_checkpoint
from recovjax.pretrain import zoo_path

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_tour_runs(trained_lenet, tmp_path, monkeypatch):
    path = zoo_path("lenet5", "mnist5k", 0)
    if not path.exists():  # A tiny trained LeNet stands in for the zoo's.
        save_checkpoint(path, trained_lenet, {"model": "lenet5", "seed": 0})
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no Python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert (tmp_path / "results.csv").is_file()
    recovered = namespace["recovered"]
    assert recovered.curve.accuracy[-1] > recovered.curve.accuracy[0]
