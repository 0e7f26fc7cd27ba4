# Two entry points, both self-contained on a machine that has only Python and pip:
#   make demo   -- the main job on the embedded MNIST digits
#   make test   -- the test suite
# Both install the tested versions pinned in requirements.lock (pip
# constraints); `make lock` regenerates it, deliberately, from the newest
# versions the package index serves.
PYTHON ?= python3
VENV   ?= .venv
LOCK   := requirements.lock
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lock clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -c $(LOCK) --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c $(LOCK) -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/recovjax demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadscope tests

bench: $(STAMP)
	$(VENV)/bin/python -m pip install --quiet -c $(LOCK) -e '.[bench]'
	$(VENV)/bin/python benchmarks/run.py

# A bump: resolve pyproject.toml's ranges (every extra) afresh in a scratch
# environment and pin what it installed. Local version labels (torch's
# "+cpu") are dropped so that the pins match any build of that release.
# Afterwards rerun `make test` and re-measure `make bench`.
lock:
	rm -rf $(VENV)-lock
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install --quiet --upgrade pip
	$(VENV)-lock/bin/python -m pip install --quiet -e '.[test,bench]'
	{ sed -n '/^#/p' $(LOCK); $(VENV)-lock/bin/python -m pip freeze --all \
	  --exclude-editable | grep -v '^wheel==' | \
	  sed -E 's/\+[[:alnum:].]+$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(VENV)-lock

clean:
	rm -rf $(VENV) $(VENV)-lock build *.egg-info .pytest_cache
