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

.PHONY: install demo test lint docs bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --quiet --upgrade pip
	@# -qq: errors only; setuptools' generic advice on editable installs (a BuildBackendWarning
	@# about folders named like the package) is not about this project and alarmed users
	$(BIN)/pip install --quiet --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@echo "== somaflow simulate $(DEMO)/sim --preset $(PRESET) --seed $(SEED)"
	@$(BIN)/somaflow simulate $(DEMO)/sim --preset $(PRESET) --seed $(SEED) --overwrite
	@set -e; eval "$$($(BIN)/python -c "import json; m = json.load(open('$(DEMO)/sim/meta.json')); \
	    print(f\"fps={m['fps']} modality={m['modality']} radius={m['neuron_radius']}\")")"; \
	echo "== somaflow run $(DEMO)/sim/movie.tif --out $(DEMO)/result.zarr --fps $$fps --modality $$modality --neuron-radius $$radius"; \
	$(BIN)/somaflow run $(DEMO)/sim/movie.tif --out $(DEMO)/result.zarr --overwrite \
	    --fps $$fps --modality $$modality --neuron-radius $$radius
	@echo "== somaflow evaluate $(DEMO)/result.zarr $(DEMO)/sim/ground_truth.zarr"
	@$(BIN)/somaflow evaluate $(DEMO)/result.zarr $(DEMO)/sim/ground_truth.zarr

test: $(STAMP)
	$(BIN)/pytest -q

docs: $(STAMP)
	$(BIN)/python docs/gen.py
	$(BIN)/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(BIN)/ruff check shared flows services tests benchmarks

clean:
	rm -rf $(DEMO) .pytest_cache site
