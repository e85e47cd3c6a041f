# One-command entry points. `make demo` and `make test` set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PLUGINS := $(wildcard plugins/dp_*)
STAMP := $(VENV)/.dpcore-installed

# Every distribution this repo ships: the core, each first-party policy, the SGLang adapter,
# the example third-party plugin, the two that keep data and benchmark machinery out of the
# core wheel, and the recording writer's compiled fast path (the core stays pure Python).
DISTS := . $(PLUGINS) adapters/sglang examples/dp_power_of_two distributions/dpcore-data distributions/dpcore-bench \
	distributions/dpcore-speedups
DIST ?= dist

.PHONY: setup demo test test-fast bench simulate dist docs clean

SPEEDUPS := distributions/dpcore-speedups

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml) examples/dp_power_of_two/pyproject.toml adapters/sglang/pyproject.toml \
		$(SPEEDUPS)/pyproject.toml $(wildcard $(SPEEDUPS)/*.c $(SPEEDUPS)/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The record extra names dpcore-speedups: this checkout's copy (built here with gcc) is it.
	$(PY) -m pip install -q -e '.[sim,http,record,test,docs]' ./$(SPEEDUPS) $(foreach p,$(PLUGINS),-e $(p)) \
		-e examples/dp_power_of_two
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

# Wheels of every distribution into $(DIST)/ (built from this checkout, no network).
dist: setup
	rm -rf $(DIST) && mkdir -p $(DIST)
	for d in $(DISTS); do $(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(DIST) $$d || exit 1; done
	@ls $(DIST)

# The documentation site into site/ (offline; --strict fails on any broken link or reference).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis dist site
