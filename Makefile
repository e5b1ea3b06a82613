# Set-up and everyday commands. Every target creates/refreshes .venv first (scripts/bootstrap.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_FLAGS ?= -q

.PHONY: setup test test-slow test-all demo bench bench-gpu info clean

setup:
	@VENV=$(VENV) bash scripts/bootstrap.sh

# The test command of the README and of CI: everything but the `slow` tests (< 15 min on 2 cores).
# pytest exits 5 when it collected nothing: that is a broken set-up, and fails like any other error.
test: setup
	@$(PY) -m pytest -m "not slow" $(PYTEST_FLAGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the set-up is broken" >&2; fi; exit $$rc

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_FLAGS)

test-all: setup
	$(PY) -m pytest $(PYTEST_FLAGS)

# The main job: CascadeXML on the bundled WN-Nouns (frozen MiniLM features + trained heads on a CPU, end-to-end
# fine-tuning on a GPU), with P@k, PSP@5 and the time of each stage. DEMO_FLAGS=--quick: a ~1 minute subset run.
DEMO_FLAGS ?=
demo: setup
	$(PY) -m cascadexml_fast demo $(DEMO_FLAGS)

bench: setup
	$(PY) benchmarks/bench_shortlist_score.py

info: setup

clean:
	rm -rf build *.egg-info cascadexml_fast/*.so $(VENV)
