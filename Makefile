# softmine: `make demo` and `make test` work on a fresh clone (they run `setup` first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-stamp

.PHONY: setup demo test lint bench ablation noise results clean \
        reproduce-cub reproduce-cars reproduce-mars reproduce-ilidsvid reproduce-lpw

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

# The authors' released settings (configs/experiment/reproduce_*.yaml). Each needs its data set
# under data/ (see docs/datasets.md) and, in practice, a GPU. Extra overrides: ARGS="...".
reproduce-cub: setup
	$(BIN)/softmine-train experiment=reproduce_cub $(ARGS)

reproduce-cars: setup
	$(BIN)/softmine-train experiment=reproduce_cars $(ARGS)

reproduce-mars: setup
	$(BIN)/softmine-train experiment=reproduce_mars $(ARGS)

reproduce-lpw: setup
	$(BIN)/softmine-train experiment=reproduce_lpw $(ARGS)

reproduce-ilidsvid: setup
	$(BIN)/softmine-train -m experiment=reproduce_ilidsvid 'dataset.split_id=range(10)' $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache

# The paper's ablation and its outlier claim on digits (each < 15 min on 2 CPU cores): a sweep,
# then its table (report.md, printed) and plots in the sweep folder. ARGS adds overrides;
# DATASET=digits_pairs runs them on the harder embedded set (100 classes, 50 unseen in training).
DATASET ?= digits
ablation noise: setup
	@start=$$(date +%s); sweep=multirun/$@/$(DATASET)_$$(date +%Y-%m-%d_%H-%M-%S); \
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/softmine-train -m experiment=$@ dataset=$(DATASET) hydra.sweep.dir=$$sweep $(ARGS) && \
	$(BIN)/softmine-report $$sweep && \
	echo "make $@: $$(( $$(date +%s) - start )) s; table and plots in $$sweep"

# docs/results.md: every results table regenerated from its command (demo, ablation, noise and
# its control sweep; ~40 min on 2 CPU cores), stamped with commit, torch version, CPU and date.
# ARGS="--only demo" regenerates one table; ARGS="--sweep ablation=DIR" reuses a finished sweep.
results: setup
	$(BIN)/python scripts/results.py $(ARGS)
