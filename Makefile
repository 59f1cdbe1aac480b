# The two commands a new user needs: `make run` and `make test`. Both set up what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test test-tools setup postgres tiny-model screenshots clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed postgres

# The embedded PostgreSQL needs the server binaries; install them where we can.
postgres:
	@sh scripts/ensure-postgres.sh

run: setup
	$(BIN)/maas start $(ARGS)

test: setup test-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-tools:
	@sh scripts/ensure-test-tools.sh

# A tiny random-weight llama model (about 0.7 MB) to try deployments with.
tiny-model: $(VENV)/.installed
	$(BIN)/python tests/tiny_gguf.py tiny.gguf

# Every screen of `maas tui` as an SVG in screenshots/ (a simulated cluster, fixed data; the same
# scenarios and rendering as tests/test_tui_snapshots.py).
screenshots: $(VENV)/.installed
	$(BIN)/python -m maas_tui.tui.screenshots screenshots

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info tiny.gguf
