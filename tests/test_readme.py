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


def test_readme_own_model_block_runs(tmp_path, monkeypatch, mnist):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    own = [block for block in blocks if "from_linen" in block]
    assert own, "README has no block about your own model"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(own[0], str(README), "exec"), namespace)
    assert (tmp_path / "my-net").is_dir()
    rows = namespace["result"].table.rows
    assert {row["damage"] for row in rows} == {"zero", "remove_neurons",
                                               "none"}
