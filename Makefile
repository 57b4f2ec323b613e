# Everything a fresh machine needs: `make test` (build + all tests), `make bench`
# (the MoE reload benchmark). Both create the virtual environment on first use,
# reusing an already installed torch (the system site packages are visible) or
# installing $(TORCH). Where a CUDA toolkit exists, `make test` also builds the
# CUDA variant against a CUDA torch in .venv-cuda and runs the suite on it
# (scripts/check-cuda-build; GPU tests skip without a GPU).
#
# The extension is built once and then only again when a source under csrc/,
# setup.py or pyproject.toml changed (or the environment was made again), and then
# incrementally: its objects stay in build/<variant>/objects. `make clean` starts
# over.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# The optional extra the tests of fastreload.hf need (they skip without it).
TRANSFORMERS ?= transformers==5.24.0
PY := $(VENV)/bin/python
CMAKE_BUILD := build/cmake
JOBS ?= $(shell nproc)
INSTALLED := $(VENV)/.installed
EXTENSION_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py pyproject.toml

.PHONY: test bench bench-sync install pytest ctest cuda-check clean

$(VENV)/.ready: pyproject.toml Makefile
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install "setuptools>=64" wheel ninja "pytest>=8" "hypothesis>=6" numpy safetensors tqdm matplotlib "$(TRANSFORMERS)"
	touch $@

# The stamp stands for the built extension: without the extension it is made again.
install:
	@ls fastreload/_C*.so >/dev/null 2>&1 || rm -f $(INSTALLED)
	@$(MAKE) --no-print-directory $(INSTALLED)

$(INSTALLED): $(VENV)/.ready $(EXTENSION_SOURCES)
	MAX_JOBS=$(JOBS) $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

ctest: $(VENV)/.ready
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(CMAKE_BUILD) -j $(JOBS)
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

pytest: install
	$(PY) -m pytest tests -q

cuda-check:
	MAX_JOBS=$(JOBS) TRANSFORMERS="$(TRANSFORMERS)" scripts/check-cuda-build

test: install ctest pytest cuda-check

bench: install
	$(PY) benchmarks/reload_moe.py $(BENCH_ARGS)

bench-sync: install
	$(PY) benchmarks/sync.py $(SYNC_ARGS)

clean:
	rm -rf build $(VENV) .venv-cuda fastreload/_C*.so *.egg-info
