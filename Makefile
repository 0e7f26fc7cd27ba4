# Two entry points, both self-contained on a machine that has only Python and pip:
#   make demo   -- the main job on the embedded MNIST digits
#   make test   -- the test suite
PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/recovjax demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadscope tests

bench: $(STAMP)
	$(VENV)/bin/python -m pip install --quiet -e '.[bench]'
	$(VENV)/bin/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
