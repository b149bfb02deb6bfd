# `make demo` and `make test` do all set-up on a fresh machine (a venv in .venv), from the lock.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV))/bin
LOCK := envs/requirements.lock
UV_VERSION := 0.13.9
CORES ?= 2
# torch is pinned apart from the lock (envs/torch.txt): its CPU and CUDA builds are different files of one
# version. The default spec takes what pip finds for that version (on this project's CI machines, the CPU
# wheel). A CUDA cluster: make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126";
# any other CPU machine: TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
TORCH ?= $(shell cat envs/torch.txt)
STAMP := $(VENV)/.installed-$(shell cat $(LOCK) envs/torch.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo test test-latest lock lint params dryrun clean chromium perf plan saelens-venv study study-runs study-dpo

# Lock first (exact versions, hashes checked, no resolution), then torch (its dependencies are already
# there at the locked versions, so pip adds only a CUDA build's own packages), then mmsae itself without
# dependencies or build isolation (setuptools is locked too); last, the venv is checked against the lock.
# --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set (as on CI)
# every job would compile transformers & co. again (+4-5 s per job, ~10 min over a demo).
define install_env
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python -m pip install -q uv==$(UV_VERSION)
	$(1)/bin/uv pip install -q --python $(1)/bin/python --no-deps --require-hashes --compile-bytecode -r $(2)
	$(1)/bin/python -m pip install -q $(TORCH)
	$(1)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(1)/bin/python -m pip check
	$(1)/bin/python mmsae/lock.py check --lock $(2)
endef

$(STAMP): $(LOCK) envs/torch.txt pyproject.toml
	$(call install_env,$(VENV),$(LOCK))
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

# Re-resolve pyproject.toml into the lock (current pins kept where they still fit; UPGRADE=1: the newest
# admitted versions, and pyproject's floors raised to them) and rewrite the conda env from it.
# Then `make test` and `make demo` (README: Keeping up).
lock: setup
	$(PY) mmsae/lock.py compile --uv $(BIN)/uv $(if $(UPGRADE),--upgrade)
	$(if $(UPGRADE),$(PY) mmsae/lock.py floors)
	$(PY) mmsae/lock.py conda

setup: $(STAMP)

demo: setup
	PATH=$(BIN):$$PATH snakemake --cores $(CORES) --configfile config/config.yaml
	@$(PY) -m mmsae.report.timings results/demo || true
	@echo "report: results/demo/report/index.html"

# The filtering study (README "The filtering study"; hours of CPU): one run per toy-world seed in STUDY_SEEDS
# (results/study-sN: its own toy world, toy model, SAE and fine-tunes; config/study.yaml over the demo config),
# one DPO run measured once (results/study-dpo), then the aggregate results/study/study.html (`snakemake study`).
# Each run builds only its report (with the curve), not the browser or the patch filter.
STUDY_SEEDS ?= 0 1 2
STUDY_CONFIG := --configfile config/config.yaml config/study.yaml
STUDY_RUNS = $(shell echo $(addprefix study-s,$(STUDY_SEEDS)) | sed 's/ /, /g')
# A seed's config is a file: snakemake's --config parses nested values as strings, and the seeds are integers.
study-runs: setup
	mkdir -p build/study
	for s in $(STUDY_SEEDS); do \
	  printf 'run: study-s%s\ntoyworld: {seed: %s}\ntoy_model: {seed: %s}\ntrain_sae: {seed: %s}\nfinetune: {seed: %s}\n' \
	    $$s $$s $$s $$s $$s \
	    > build/study/seed$$s.yaml && \
	  PATH=$(BIN):$$PATH snakemake --cores $(CORES) results/study-s$$s/report/report.json $(STUDY_CONFIG) \
	    build/study/seed$$s.yaml || exit 1; \
	done

# DPO measured once, on the arms of config/study-dpo.yaml (12 fine-tunes; a DPO step costs 2.1x an SFT step)
study-dpo: setup
	PATH=$(BIN):$$PATH snakemake --cores $(CORES) results/study-dpo/report/report.json $(STUDY_CONFIG) \
	  config/study-dpo.yaml

study: study-runs study-dpo
	PATH=$(BIN):$$PATH snakemake --cores $(CORES) study $(STUDY_CONFIG) \
	  --config "study={runs: [$(STUDY_RUNS)], dpo_runs: [study-dpo]}"
	@echo "study: results/study/study.html"

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

# MMSAE_LOCK: tests/test_lock.py checks the installed versions against it. saelens-venv: SAELens for
# tests/test_saelens_load.py (built once; when it cannot be, the reason is printed and that test skips).
test: setup chromium saelens-venv
	PATH=$(BIN):$$PATH MMSAE_LOCK=$(abspath $(LOCK)) python -m pytest -q --durations=15 tests

# Drift check: a throwaway venv with the newest versions pyproject.toml admits (torch stays at its pin),
# then the whole suite. Run it before moving the lock, and on a schedule (README: "Keeping up").
LATEST := build/venv-latest
test-latest: chromium
	rm -rf $(LATEST) && mkdir -p build && python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q uv==$(UV_VERSION)
	$(LATEST)/bin/python mmsae/lock.py compile --upgrade --uv $(abspath $(LATEST))/bin/uv --out $(LATEST)/latest.txt
	$(call install_env,$(LATEST),$(LATEST)/latest.txt)
	@$(LATEST)/bin/python mmsae/lock.py diff $(LOCK) $(LATEST)/latest.txt
	PATH=$(abspath $(LATEST))/bin:$$PATH python -m pytest -q --durations=15 tests

# Benchmarks (perf/README.md): SAELens, the peer of perf/sae_train.py, gets its own venv (its pins differ
# from ours), with the same torch build first. PERF_ARGS go to every script, e.g. PERF_ARGS="--threads 2".
SAELENS_VENV := perf/.venv-saelens
SAELENS := sae-lens==6.54.12
SAELENS_STAMP := $(SAELENS_VENV)/.installed-$(shell echo '$(TORCH) $(SAELENS)' | cksum | cut -d' ' -f1)

$(SAELENS_STAMP):
	test -x $(SAELENS_VENV)/bin/python || python3 -m venv $(SAELENS_VENV)
	$(SAELENS_VENV)/bin/python -m pip install -q --upgrade pip
	$(SAELENS_VENV)/bin/python -m pip install -q $(TORCH)
	$(SAELENS_VENV)/bin/python -m pip install -q $(SAELENS)
	rm -f $(SAELENS_VENV)/.installed-*
	touch $@

# Tolerant build of the SAELens venv for `make test`: pip's own error, then one line saying what it costs.
saelens-venv:
	@$(MAKE) --no-print-directory $(SAELENS_STAMP) || \
	  echo "warning: could not build $(SAELENS_VENV) with $(SAELENS) (pip's error above; no package index?):" \
	       "tests/test_saelens_load.py will skip" >&2

perf: setup $(SAELENS_STAMP)
	$(PY) perf/sae_train.py $(PERF_ARGS)
	$(PY) perf/sae_flops.py $(PERF_ARGS)
	$(PY) perf/extract_overhead.py $(PERF_ARGS)
	$(PY) perf/scale.py $(PERF_ARGS)
	$(PY) perf/store_read.py $(PERF_ARGS)
	@echo "JSON results: perf/out/"

# What a config will cost before running it (mmsae/plan.py): results/{run}/plan/plan.md + plan.json.
# make plan CONFIG=config/presets/llava-next-7b.yaml
CONFIG ?= config/config.yaml
plan: setup
	PATH=$(BIN):$$PATH snakemake --cores 1 --configfile $(CONFIG) plan
	@cat $$(ls -t results/*/plan/plan.md | head -1)

lint: setup
	$(BIN)/ruff check .

# The typed stage params (mmsae/params.py) are generated from config/schema.yaml: run after editing it.
params: setup
	$(BIN)/python -m mmsae.config params

dryrun: setup
	PATH=$(BIN):$$PATH snakemake -n --quiet rules
	PATH=$(BIN):$$PATH snakemake -n --quiet rules --workflow-profile profiles/slurm

clean:
	rm -rf results .snakemake
