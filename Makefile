# softmine: `make demo` and `make test` work on a fresh clone (they run `setup` first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-stamp
DOCS_STAMP := $(VENV)/.docs-stamp

.PHONY: setup demo test test-fast lint bench ablation noise results clean docs docs-serve tune fair \
        authors-cub authors-cars authors-mars authors-ilidsvid authors-lpw \
        authors-cub-bbox authors-cars-bbox \
        reproduce-cub reproduce-cars reproduce-mars reproduce-ilidsvid reproduce-lpw \
        reproduce-cub-bbox reproduce-cars-bbox

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/softmine-train experiment=demo

# `test` is the whole suite as CI runs it, with its 20 slowest tests listed at the end;
# `test-fast` leaves out the end-to-end runs marked slow (pytest -m slow selects them).
test: setup
	$(BIN)/python -m pytest -n auto --durations=20

test-fast: setup
	$(BIN)/python -m pytest -n auto -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The documentation site (mkdocs.yml, docs/): `docs` builds it into site/ in strict mode (a warning,
# a broken link or anchor, a page left out of the nav, an unresolved API reference fails);
# `docs-serve` serves it on http://127.0.0.1:8000 and rebuilds on every edit.
$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/python scripts/gen_config_docs.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(DOCS_STAMP)
	$(BIN)/python scripts/gen_config_docs.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# Every scripts/bench/*.py but the helpers named _*.py; prints its total time (1,111 s on 2 CPU
# cores shared with other jobs, load average 5-7; eval.py and train.py take most of it).
bench: setup
	@start=$$(date +%s); for b in scripts/bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done; \
	echo "make bench: $$(( $$(date +%s) - start )) s"

# The authors' released settings (configs/experiment/authors_*.yaml). Each needs its data set
# under data/ (see docs/datasets.md) and, in practice, a GPU. Extra overrides: ARGS="...".
authors-cub: setup
	$(BIN)/softmine-train experiment=authors_cub $(ARGS)

authors-cars: setup
	$(BIN)/softmine-train experiment=authors_cars $(ARGS)

authors-cub-bbox: setup
	$(BIN)/softmine-train experiment=authors_cub_bbox $(ARGS)

authors-cars-bbox: setup
	$(BIN)/softmine-train experiment=authors_cars_bbox $(ARGS)

authors-mars: setup
	$(BIN)/softmine-train experiment=authors_mars $(ARGS)

authors-lpw: setup
	$(BIN)/softmine-train experiment=authors_lpw $(ARGS)

authors-ilidsvid: setup
	$(BIN)/softmine-train -m experiment=authors_ilidsvid 'dataset.split_id=range(10)' $(ARGS)

# The old names of the targets above (before issue 24): each runs its authors-* target.
reproduce-cub: authors-cub
reproduce-cars: authors-cars
reproduce-cub-bbox: authors-cub-bbox
reproduce-cars-bbox: authors-cars-bbox
reproduce-mars: authors-mars
reproduce-lpw: authors-lpw
reproduce-ilidsvid: authors-ilidsvid

clean:
	rm -rf $(VENV) outputs multirun site .pytest_cache .ruff_cache

# The paper's ablation and its outlier claim on digits (each < 15 min on 2 CPU cores): a sweep,
# then its table (report.md, printed) and plots in the sweep folder. ARGS adds overrides;
# DATASET=digits_pairs runs them on the harder embedded set (100 classes, 50 unseen in training).
# On digits_pairs `make noise` runs experiment=noise_fair: each loss with its tuned setting
# (make tune) on the fair benchmark's network and protocol.
DATASET ?= digits
EXPERIMENT_ablation := ablation
EXPERIMENT_noise := $(if $(filter digits_pairs,$(DATASET)),noise_fair,noise)
ablation noise: setup
	@start=$$(date +%s); sweep=multirun/$@/$(DATASET)_$$(date +%Y-%m-%d_%H-%M-%S); \
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/softmine-train -m experiment=$(EXPERIMENT_$@) dataset=$(DATASET) hydra.sweep.dir=$$sweep $(ARGS) && \
	$(BIN)/softmine-report $$sweep && \
	echo "make $@: $$(( $$(date +%s) - start )) s; table and plots in $$sweep"

# The fair benchmark (docs/fair-benchmark.md; needs the tune extra, part of dev). `make tune` runs
# (or resumes) the tuning study of LOSS (a loss, a comma-separated list, or all) on DATASET
# (default here: digits_pairs) and writes configs/tuned/<dataset>/<loss>.yaml; `make fair` trains
# every loss with its tuned setting over seeds 0-4, two at a time, and writes the table.
LOSS ?= all
FAIR_DATASET = $(if $(filter command line environment,$(origin DATASET)),$(DATASET),digits_pairs)
tune: setup
	$(BIN)/python -m softmine.commands.tune --dataset $(FAIR_DATASET) --loss $(LOSS) $(ARGS)

fair: setup
	@start=$$(date +%s); $(BIN)/python -m softmine.commands.fair run --dataset $(FAIR_DATASET) $(ARGS) && \
	echo "make fair: $$(( $$(date +%s) - start )) s"

# docs/results.md, docs/benchmarks-digits-pairs.md and docs/evaluation-protocols.md: every
# results table regenerated from its command (digits demo, ablation, noise and its control
# sweep; digits_pairs demo and ablation; the model selection and cross-validation examples;
# ~25 min on 2 shared CPU cores), stamped with commit, torch version, CPU and date, then the
# README's demo and summary blocks copied from them. ARGS="--only demo" regenerates one table;
# ARGS="--sweep ablation=DIR" reuses a finished sweep; ARGS="--readme" only copies into README.
results: setup
	$(BIN)/python scripts/results.py $(ARGS)
