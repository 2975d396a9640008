# The two commands a newcomer needs: `make run` and `make test`. Both bootstrap first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: bootstrap run lint test bench shelldocs clean
bootstrap:
	@scripts/bootstrap.sh

run: bootstrap
	$(VENV)/bin/fsnotifyd run

# ruff and mypy (config in pyproject.toml); `make test` runs them first, so a lint error fails it before pytest.
lint: bootstrap
	$(VENV)/bin/ruff check fsnotifyd tests bench
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

# Shell completion (bash, zsh) and the man page, from the CLI's parser (docs/cli.md).
shelldocs: bootstrap
	$(PY) -m fsnotifyd.app.shelldocs --out build/shelldocs

bench: bootstrap
	$(PY) bench/latency.py
	$(PY) bench/memory.py
	$(PY) bench/rules_replay.py
	$(PY) bench/image_io.py
	$(PY) bench/image_ops.py
	$(PY) bench/image_swelling.py
	$(PY) bench/repack.py --load
	$(PY) bench/alloc_figures.py
	$(PY) bench/isolate_latency.py
	$(PY) bench/bpf_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache
