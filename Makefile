# somaflow — the two commands of the README:
#   make demo   set up, simulate a movie, run the whole pipeline on it, score it
#   make test   set up and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO ?= demo
PRESET ?= 2p-small
SEED ?= 0

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/somaflow simulate $(DEMO)/sim --preset $(PRESET) --seed $(SEED) --overwrite
	$(BIN)/somaflow run $(DEMO)/sim/movie.tif --out $(DEMO)/result.zarr --overwrite \
	    --fps $$($(BIN)/python -c "import json; print(json.load(open('$(DEMO)/sim/meta.json'))['fps'])") \
	    --modality $$($(BIN)/python -c "import json; print(json.load(open('$(DEMO)/sim/meta.json'))['modality'])") \
	    --neuron-radius $$($(BIN)/python -c "import json; print(json.load(open('$(DEMO)/sim/meta.json'))['neuron_radius'])")
	$(BIN)/somaflow evaluate $(DEMO)/result.zarr $(DEMO)/sim/ground_truth.zarr
	@echo "result: $(abspath $(DEMO))/result.zarr"

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check shared flows services tests benchmarks

clean:
	rm -rf $(DEMO) .pytest_cache
