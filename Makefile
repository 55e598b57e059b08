# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NLTK_STAMP := .nltk_data/corpora/wordnet/lexnames
DATA ?= data/scenes
DEMO_IMAGES ?= 3000
DEMO_SIZE ?= 128

# W&B never prompts and never waits on a network unless the user asks for online.
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export WANDB_CACHE_DIR ?= $(CURDIR)/runs/.wandb-cache
export WANDB_CONFIG_DIR ?= $(CURDIR)/runs/.wandb-config
export NLTK_DATA := $(CURDIR)/.nltk_data
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads
# made a two-thread run up to 20x slower (docs/BENCHMARKS.md, demo section).
export OMP_WAIT_POLICY ?= PASSIVE
export PYTHONPATH := $(CURDIR)

.PHONY: demo test setup install nltk data clean

demo: setup
	$(PY) scripts/demo.py --data-root $(DATA)

test: setup
	$(PY) -m pytest -q

setup: install nltk data

install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

nltk: $(NLTK_STAMP)
$(NLTK_STAMP): scripts/setup_nltk.sh
	bash scripts/setup_nltk.sh .nltk_data

data: $(DATA)/scenes.json
$(DATA)/scenes.json: datamodules/scenes.py datamodules/scenes_news.py | $(STAMP)
	$(PY) -m datamodules.scenes --root $(DATA) --num-images $(DEMO_IMAGES) --size $(DEMO_SIZE)

clean:
	rm -rf runs data .pytest_cache
