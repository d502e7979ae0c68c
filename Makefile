# The two commands of this project. Both set up .venv first (once; redone when
# pyproject.toml changes), using only python3, pip and the package registries.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: bench test setup clean

bench: $(STAMP)
	$(PY) -m chatterbox_lab bench --ladder $(BENCH_ARGS)

test: $(STAMP)
	$(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider $(TEST_ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_venv.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_venv.sh
	touch $(STAMP)

clean:
	rm -rf $(VENV) bench-results runs
