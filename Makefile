# The two commands of the README: `make demo` runs the main job on its embedded defaults, `make test` runs
# the test suite. Both create .venv (Python 3.11) and install the pinned stack when it is missing or stale.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test compile lint gpu-check lock lock-gpu clean

# uv installs the lock (unpacking and byte-compiling on every core) in under half pip's time. It takes
# every package from its index (PyPI unless UV_INDEX_URL or uv.toml says otherwise) and reads no pip.conf.
UV_VERSION := 0.13.9

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode -c constraints.txt -e '.[test,launch]'
	touch $@

# The project's own modules byte-compiled ahead (changed ones only): every Ray worker, job and Tune trial
# imports them, and where PYTHONDONTWRITEBYTECODE is set each would compile them again.
compile: $(STAMP)
	$(BIN)/python -m compileall -q gmpatl_ray jobs

demo: compile
	$(BIN)/gmpatl cv --config configs/demo.yaml

test: compile
	$(BIN)/ruff check gmpatl_ray jobs tests benchmarks tools
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check gmpatl_ray jobs tests benchmarks tools

# The GPU paths measured on one GPU in minutes (benchmarks/gpu_check.py); where there is a GPU it adds cuML
# (the GPU lock's version) first. Without a GPU it says so and exits 0.
gpu-check: $(STAMP)
	if $(BIN)/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then \
	  $(BIN)/python -m pip install --quiet -c constraints-gpu.txt -e '.[gpu]'; fi
	$(BIN)/python benchmarks/gpu_check.py

# Re-pin every transitive dependency after changing pyproject.toml (commit the result), then the GPU
# nodes' lock (constraints-gpu.txt, what the Dockerfile installs) from it: a pip dry run, nothing installed.
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable --exclude gmpatl-ray --exclude uv > constraints.txt
	$(MAKE) lock-gpu

lock-gpu: $(STAMP)
	$(BIN)/python tools/gpu_lock.py --write

clean:
	rm -rf $(VENV) outputs .pytest_cache
