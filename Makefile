# Thin wrappers around the `pipeline` command. `make help` lists the targets.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch is installed first and pinned: on this project's machines these wheels come from local disk.
TORCH   ?= torch==2.14.1 torchvision==0.29.1
# the exact versions CI tests (pip-tools, `make lock`), used as pip constraints; `make install LOCK=`: unpinned
LOCKFILE := requirements.lock
LOCK    ?= $(LOCKFILE)
LOCK_TOOLS ?= .venv-lock

SUBSET  ?= sdv14
# any other dataset (README: "Your own data and other benchmarks"): labelled folders under $(DATA)
DATASET ?=
NAME     = $(or $(DATASET),$(SUBSET))
DATA    ?= /data/GenImage
CACHE   ?= cache
# empty: the command's own default (`pipeline <command> --help` shows it), written once in its config
MODEL   ?=
DEVICE  ?=
METHOD  ?=
GRID    ?=
TABLE   ?=
EXTRA   ?=
DEMO    ?= demo
RUNS    ?= runs
RESULTS ?= results
RUN     ?=
TEST_SUBSETS ?= $(SUBSET)
# the demo: 64 px maps aligned with the pixel crops, tiny CLIP backbones (random init), 32 px crops
DEMO_LARE  ?= --size 64 --pixel-size 64 --preprocess crop
DEMO_TRAIN ?= --backbone tiny-RN --backbone-weights random --crop-size 32 --lr 1e-3 --epochs 30 --batch-size 16

# `--option VALUE` when the variable is set, nothing (the command's default) when it is empty
opt = $(if $(2),--$(1) $(2))

.PHONY: help install lock extract train eval report robustness reproduce demo test test-fast lint bench bench-gpu clean-demo

help:
	@echo "make help                         this list"
	@echo "make install                      create $(VENV) and install the pipeline with its dev tools, at the"
	@echo "                                  versions of \$$(LOCK); LOCK= installs the newest that fit pyproject.toml"
	@echo "make lock                         regenerate $(LOCKFILE) from pyproject.toml and \$$(TORCH) (pip-compile)"
	@echo "make demo                         synthetic sdv14 and adm sets -> extract (tiny model) -> train EGRE and LoL"
	@echo "                                  -> eval -> ACC table and \$$(DEMO)/results/matrix.png (README: what it means)"
	@echo "make test                         the test suite (CPU only, tiny models)"
	@echo "make test-fast                    the suite without the tests marked slow (no pipeline subprocess, no long training)"
	@echo "make lint                         ruff check and format check, mypy (pipeline, stages), import layers, tests/ layout"
	@echo "make extract SUBSET=sdv14 DATA=/data/GenImage CACHE=cache MODEL=... DEVICE=cuda EXTRA='--ensemble 4'"
	@echo "make extract DATASET=mine DATA=my_images   any folder of labelled folders -> \$$(CACHE)/mine.zarr"
	@echo "make train SUBSET=sdv14 METHOD=lol EXTRA='--max-per-class all'   train from \$$(CACHE)/\$$(SUBSET).zarr"
	@echo "                                  MODEL, DEVICE, METHOD, GRID not given: the command's defaults (--help)"
	@echo "make eval RUN=runs/<run> TEST_SUBSETS='adm biggan'   evaluate a run on caches -> \$$(RESULTS)/"
	@echo "make report                       train x test table and \$$(RESULTS)/matrix.png"
	@echo "make robustness GRID=lol-a4 METHOD=lol SUBSET=sdv14 TEST_SUBSETS='adm biggan'   -> \$$(RESULTS)/robustness/"
	@echo "make reproduce TABLE=lol-table1 DATA=/data/GenImage DEVICE=cuda   a paper's table, ours beside it -> \$$(RESULTS)/reproduce/"
	@echo "make bench                        extraction, training-I/O, loader, decode+perturb, small-set and torchrun benchmarks (bench/results/)"
	@echo "make bench-gpu                    every GPU figure in one run, ~8 min (bench/gpu.py; needs CUDA)"
	@echo "make clean-demo                   remove \$$(DEMO)/"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(pinned) $(TORCH)
	$(BIN)/python -m pip install -q $(pinned) -e '.[dev]'
	touch $@

# `-c LOCK`: every package at its locked version (a constraint, so the package itself is not pinned)
pinned = $(if $(LOCK),-c $(LOCK))

# pip-tools in a venv of its own, so that $(VENV) holds what the lock lists and nothing else
lock:
	$(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/python -m pip install -q pip-tools==7.7.0
	printf '%s\n' $(TORCH) > $(LOCK_TOOLS)/torch.txt
	CUSTOM_COMPILE_COMMAND='make lock' $(LOCK_TOOLS)/bin/pip-compile -q --extra dev --strip-extras --no-emit-index-url --no-emit-find-links \
		$(foreach p,lare-pipeline pip setuptools,--unsafe-package $(p)) --constraint $(LOCK_TOOLS)/torch.txt \
		--output-file $(LOCKFILE) pyproject.toml

extract: install
	$(BIN)/pipeline extract --data-root $(DATA) $(if $(DATASET),--dataset $(DATASET),--subset $(SUBSET)) --cache-dir $(CACHE) \
		$(call opt,model,$(MODEL)) $(call opt,device,$(DEVICE)) $(EXTRA)

train: install
	$(BIN)/pipeline train --from-cache $(CACHE)/$(NAME).zarr $(call opt,method,$(METHOD)) \
		$(call opt,device,$(DEVICE)) --out $(RUNS) $(EXTRA)

eval: install
	@test -n "$(RUN)" || { echo "make eval needs RUN=<run directory printed by make train>"; exit 2; }
	$(BIN)/pipeline eval --checkpoint $(RUN) --from-cache $(foreach s,$(TEST_SUBSETS),$(CACHE)/$(s).zarr) \
		$(call opt,device,$(DEVICE)) --out $(RESULTS) $(EXTRA)

report: install
	$(BIN)/pipeline report $(RESULTS) --out $(RESULTS)/matrix.png

robustness: install
	$(BIN)/pipeline robustness --data-root $(DATA) --train-subset $(SUBSET) \
		--test-subsets $(shell echo $(TEST_SUBSETS) | tr ' ' ',') $(call opt,grid,$(GRID)) \
		$(call opt,method,$(METHOD)) --cache-dir $(CACHE) $(call opt,model,$(MODEL)) \
		$(call opt,device,$(DEVICE)) --out $(RESULTS)/robustness $(EXTRA)

reproduce: install
	@test -n "$(TABLE)" || { echo "make reproduce needs TABLE=lol-table1|lol-table2|lol-table3|lare2|lare2-reference"; exit 2; }
	$(BIN)/pipeline reproduce $(TABLE) --data-root $(DATA) --cache-dir $(CACHE) $(call opt,model,$(MODEL)) \
		$(call opt,device,$(DEVICE)) --out $(RESULTS)/reproduce $(EXTRA)

demo: install
	$(BIN)/pipeline synth $(DEMO)/data --subset sdv14 --train 16 --val 8
	$(BIN)/pipeline synth $(DEMO)/data --subset adm --train 16 --val 8 --seed 1
	for s in sdv14 adm; do \
		$(BIN)/pipeline extract --data-root $(DEMO)/data --subset $$s --cache-dir $(DEMO)/cache \
			--model tiny --device cpu --rows-per-shard 16 $(DEMO_LARE) --no-progress || exit 1; \
	done
	$(BIN)/pipeline cache info $(DEMO)/cache/sdv14.zarr
	$(BIN)/pipeline cache verify $(DEMO)/cache/sdv14.zarr
	for m in egre lol; do \
		run=$$($(BIN)/pipeline train --from-cache $(DEMO)/cache/sdv14.zarr --method $$m --out $(DEMO)/runs \
			$(DEMO_TRAIN) --no-progress) || exit 1; \
		$(BIN)/pipeline eval --checkpoint $$run --from-cache $(DEMO)/cache/sdv14.zarr $(DEMO)/cache/adm.zarr \
			--out $(DEMO)/results --no-progress || exit 1; \
	done
	$(BIN)/pipeline report $(DEMO)/results --out $(DEMO)/results/matrix.png
	$(BIN)/pipeline runs $(DEMO)/runs

test: install
	$(BIN)/python -m pytest -q -n 2

test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy
	$(BIN)/python -m pytest -q tests/system/test_layers.py  # the import layers, and tests/ mirroring the code

bench: install
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/train_io.py
	$(BIN)/python bench/train_loader.py
	$(BIN)/python bench/perturb.py
	$(BIN)/python bench/small_set.py
	$(BIN)/python bench/ddp.py

bench-gpu: install
	$(BIN)/python bench/gpu.py --device cuda $(EXTRA)

clean-demo:
	rm -rf $(DEMO)
