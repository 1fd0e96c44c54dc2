# Set-up is two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch as this machine has it on disk (a CUDA build that runs on CPU); elsewhere override TORCH_PKGS or preinstall.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -e ".[dev,offline]"
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/demo.py --config configs/demo.yaml

test: $(VENV)/.installed
	$(VENV)/bin/ruff check hnet scripts tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m pytest tests

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs
