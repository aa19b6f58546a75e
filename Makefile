# Every target bootstraps .venv with the on-disk CPU torch 2.13.0 first, so nothing pulls a newer torch.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hessforge-installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

.PHONY: install demo test test-slow build
install: $(STAMP)

# C++ core + pybind11 module (engine/_core*.so) + LAMMPS plugin (build/hessforgeplugin.so); incremental
BUILD_DIR ?= build
build: $(STAMP)
	cmake -S . -B $(BUILD_DIR) -DPython_EXECUTABLE=$(abspath $(PY))
	cmake --build $(BUILD_DIR) -j 2

demo: $(STAMP)
	$(VENV)/bin/hessforge quickstart

test: $(STAMP) build
	$(PY) -m pytest -q -m "not slow" tests

# exit status 5 (no test marked slow) counts as success
test-slow: $(STAMP) build
	$(PY) -m pytest -q -m slow tests || [ $$? -eq 5 ]
