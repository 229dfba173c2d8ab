# softmine: `make demo` and `make test` work on a fresh clone (they run `setup` first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-stamp

.PHONY: setup demo test lint bench ablation noise clean \
        reproduce-cub reproduce-cars reproduce-mars reproduce-ilidsvid

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/softmine-train experiment=demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	@for b in scripts/bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

reproduce-cub reproduce-cars reproduce-mars reproduce-ilidsvid: setup
	@echo "$@ needs the dataset under data/ and a GPU; it is added by the 'models and training at paper scale' issue." >&2; exit 2

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache

# The paper's ablation and its outlier claim on digits (each < 15 min on 2 CPU cores): a sweep,
# then its table (report.md, printed) and plots in the sweep folder. ARGS adds overrides.
ablation noise: setup
	@start=$$(date +%s); sweep=multirun/$@/$$(date +%Y-%m-%d_%H-%M-%S); \
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/softmine-train -m experiment=$@ hydra.sweep.dir=$$sweep $(ARGS) && \
	$(BIN)/softmine-report $$sweep && \
	echo "make $@: $$(( $$(date +%s) - start )) s; table and plots in $$sweep"
