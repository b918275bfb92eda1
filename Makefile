# attnpilot — the two commands: `make demo` and `make test`. Each installs what is
# missing (scripts/install-deps.sh), configures and builds in build/ (Release), then runs.
VENV   ?= $(HOME)/.local/share/attnpilot/venv
BUILD  ?= build
JOBS   ?= $(shell nproc)
PYTHON := $(VENV)/bin/python
export ATTNPILOT_VENV := $(VENV)

.PHONY: all deps configure build test demo format clean

all: build

deps:
	@bash scripts/install-deps.sh

configure: deps
	@cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch;print(torch.utils.cmake_prefix_path)')" \
	  -DATTNPILOT_PYTHON=$(PYTHON) $(CMAKE_ARGS)

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

test: build
	@cd $(BUILD) && ctest --output-on-failure --timeout 900 -j $(JOBS) $(CTEST_ARGS)

demo: configure
	@cmake --build $(BUILD) -j $(JOBS) --target attnpilot
	@bash scripts/demo.sh $(BUILD)

format:
	@git ls-files '*.h' '*.cpp' '*.cu' '*.cuh' | xargs clang-format -i

clean:
	rm -rf $(BUILD)
