# make train   — set up .venv if needed, then train the default job (PANet on the synthetic benchmark)
# make test    — set up .venv if needed, then run the whole test suite (CPU, no network)
# make bench   — throughput and memory benchmarks (table on stdout, JSON in bench_results/)
# Extra arguments: make train ARGS="method=panet fold=1 shot=5"; make test PYTEST_ARGS="-k metric"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install train test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m fewshotseg.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench.py $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

clean:
	rm -rf logs bench_results .pytest_cache
