# Set-up and main jobs. Everything installs into .venv; nothing is needed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
LLAMA_CPP_VERSION := $(shell sed -n 's/^version = //p' vendor/llama-cpp-python.pin)
# llava is not used; skipping it shortens llama-cpp-python's source build
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

SOURCES := pyproject.toml CMakeLists.txt vendor/llama-cpp-python.pin vendor/fetch_headers.py \
           $(wildcard ggml_powerinfer/*) $(wildcard bindings/*) $(wildcard python/powerinfer/*.py)

.PHONY: install test demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "scikit-build-core>=0.10" "pybind11>=2.12" "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(PY) -m pip install --quiet --no-build-isolation ".[test]"
	touch $@

test: install
	$(PY) -m pytest -q tests

demo: install
	$(VENV)/bin/powerinfer demo

bench: install
	$(VENV)/bin/powerinfer make-test-model --preset 1b --type q4_0 $(VENV)/bench-1b-q4_0.gguf
	$(VENV)/bin/powerinfer bench $(VENV)/bench-1b-q4_0.gguf

clean:
	rm -rf build $(VENV) vendor/_build
