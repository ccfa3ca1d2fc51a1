# Thin wrappers around the `pipeline` command. `make help` lists the targets.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch is installed first and pinned: on this project's machines these wheels come from local disk.
TORCH   ?= torch==2.14.1 torchvision==0.29.1

SUBSET  ?= sdv14
DATA    ?= /data/GenImage
CACHE   ?= cache
MODEL   ?= stable-diffusion-v1-5/stable-diffusion-v1-5
DEVICE  ?= auto
EXTRA   ?=
DEMO    ?= demo

.PHONY: help install extract demo test lint bench clean-demo

help:
	@echo "make install                      create $(VENV) and install the pipeline with its dev tools"
	@echo "make demo                         synthetic GenImage-layout set -> extract (tiny model) -> cache summary"
	@echo "make test                         the test suite (CPU only, tiny models)"
	@echo "make extract SUBSET=sdv14 DATA=/data/GenImage CACHE=cache MODEL=... DEVICE=cuda EXTRA='--ensemble 4'"
	@echo "make bench                        extraction benchmark (bench/results/)"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

extract: install
	$(BIN)/pipeline extract --data-root $(DATA) --subset $(SUBSET) --cache-dir $(CACHE) \
		--model $(MODEL) --device $(DEVICE) $(EXTRA)

demo: install
	$(BIN)/pipeline synth $(DEMO)/data --subset sdv14 --train 16 --val 8
	$(BIN)/pipeline extract --data-root $(DEMO)/data --subset sdv14 --cache-dir $(DEMO)/cache \
		--model tiny --device cpu --rows-per-shard 16
	$(BIN)/pipeline cache info $(DEMO)/cache/sdv14.zarr
	$(BIN)/pipeline cache verify $(DEMO)/cache/sdv14.zarr

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/extract.py

clean-demo:
	rm -rf $(DEMO)
