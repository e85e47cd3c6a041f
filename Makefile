# One-command entry points. `make demo` and `make test` set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PLUGINS := $(wildcard plugins/dp_*)
STAMP := $(VENV)/.dpcore-installed

.PHONY: setup demo test test-fast bench simulate clean

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml) examples/dp_power_of_two/pyproject.toml adapters/sglang/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[sim,http,test]' $(foreach p,$(PLUGINS),-e $(p)) -e examples/dp_power_of_two
	# The SGLang adapter's tooling only: SGLang itself (CUDA wheels, GBs) stays out of .venv;
	# its tests build a pinned CPU venv of their own (adapters/sglang/dpcore_sglang/venv.py).
	$(PY) -m pip install -q --no-deps -e adapters/sglang
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/dpcore demo

# pytest exits 5 when it collected no tests: that is a failure here, and says so.
test: setup
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -m "not interop and not sglang and not soak and not fuzz"

bench: setup
	$(VENV)/bin/dpcore bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
