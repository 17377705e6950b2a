# diffmem: `make demo` (set up, run the main job, write demo-out/report.html) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast lint fuzz bench bench-quick bench-evidence clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[all,dev]"
	touch $@

demo: install
	$(PY) -m diffmem demo --out demo-out

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

# Issue 15's long fuzz run of `diffmem filter` (2,000 mutated LoRAs, a few minutes); `make test` runs 60 of them.
# The outcome counts go to docs/fuzz.json, quoted in docs/bad-input.md.
fuzz: install
	DIFFMEM_FUZZ_EXAMPLES=2000 DIFFMEM_FUZZ_REPORT=docs/fuzz.json $(PY) -m pytest -q tests/test_fuzz.py \
		--hypothesis-show-statistics

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Issue 5's benchmark: the full grid (hours; resumable) and the quick one (about 10 minutes).
bench: install
	$(PY) -m diffmem bench --out docs/results.md

bench-quick: install
	$(PY) -m diffmem bench --quick

# Issue 18's evidence grid (9 to 12 core-hours for 5 seeds; resumable), its report and the rows behind it in docs/.
bench-evidence: install
	$(PY) -m diffmem bench --grid evidence --out docs/evidence/results.md
	cp runs/bench-evidence/results.jsonl docs/evidence/results/results.jsonl

clean:
	rm -rf demo-out .pytest_cache .ruff_cache
