# The README's two commands: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench gpu-check lint clean

$(BIN)/mmtune: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first, in the same command as the package: otherwise accelerate/peft pull a CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install --quiet -e ".[dev]"; \
	else \
		$(BIN)/pip install --quiet "torch==2.13.0" -e ".[dev]"; \
	fi
	touch $(BIN)/mmtune

setup: $(BIN)/mmtune

demo: setup
	$(BIN)/mmtune demo --out runs/demo

# Two pytest-xdist workers, one per core, each taking whole files (a file's launched runs are one module fixture).
# The 25 slowest tests are listed at the end: where the suite's ~10 minutes go (issue 39).
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

bench: setup
	$(BIN)/python benchmarks/run_all.py
	$(BIN)/python benchmarks/step_tax.py
	$(BIN)/python benchmarks/target_logits.py
	$(BIN)/python benchmarks/tokens_that_count.py

# On a machine with a CUDA GPU (≤ 8 minutes on one): step time, tokens/s, peak memory → gpu_check.json.
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py --out gpu_check.json

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
