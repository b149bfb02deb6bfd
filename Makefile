# `make demo` and `make test` do all set-up on a fresh machine (a venv in .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
CORES ?= 2
# CPU torch by default: a bare `torch` requirement would pull a multi-GB CUDA build. On a GPU machine
# run `make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"`.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint dryrun clean chromium bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[workflow,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

demo: setup
	PATH=$(BIN):$$PATH snakemake --cores $(CORES) --configfile config/config.yaml
	@echo "report: results/demo/report/index.html"

# Headless Chromium for tests/test_browser.py (the feature browser, opened from file://): installed
# through apt-get when missing and we are root; otherwise stop with a message (the test never skips).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else \
	    echo "error: chromium is not on PATH; install it (e.g. apt-get install chromium) for tests/test_browser.py" >&2; \
	    exit 1; \
	  fi; }

test: setup chromium
	PATH=$(BIN):$$PATH python -m pytest -q --durations=15 tests

# Benchmarks (bench/README.md): SAELens, the peer of bench/sae_train.py, gets its own venv (its pins differ
# from ours), with the same torch build first. BENCH_ARGS go to every script, e.g. BENCH_ARGS="--threads 2".
SAELENS_VENV := bench/.venv-saelens
SAELENS := sae-lens==6.54.12
SAELENS_STAMP := $(SAELENS_VENV)/.installed-$(shell echo '$(TORCH) $(SAELENS)' | cksum | cut -d' ' -f1)

$(SAELENS_STAMP):
	test -x $(SAELENS_VENV)/bin/python || python3 -m venv $(SAELENS_VENV)
	$(SAELENS_VENV)/bin/python -m pip install -q --upgrade pip
	$(SAELENS_VENV)/bin/python -m pip install -q $(TORCH)
	$(SAELENS_VENV)/bin/python -m pip install -q $(SAELENS)
	rm -f $(SAELENS_VENV)/.installed-*
	touch $@

bench: setup $(SAELENS_STAMP)
	$(PY) bench/sae_train.py $(BENCH_ARGS)
	$(PY) bench/sae_flops.py $(BENCH_ARGS)
	$(PY) bench/extract_overhead.py $(BENCH_ARGS)
	$(PY) bench/scale.py $(BENCH_ARGS)
	@echo "JSON results: bench/out/"

lint: setup
	$(BIN)/ruff check .

dryrun: setup
	PATH=$(BIN):$$PATH snakemake -n --quiet rules
	PATH=$(BIN):$$PATH snakemake -n --quiet rules --workflow-profile profiles/slurm

clean:
	rm -rf results .snakemake
