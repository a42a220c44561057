# soundscape-ssl: `make demo` runs the whole study on the synthetic archive, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= demo
RUN_ID ?=
PYTEST_ARGS ?=

.PHONY: setup demo test lab clean-runs

# The stamp is rebuilt whenever pyproject.toml changes, so a `git pull` that adds a
# dependency reinstalls on the next make.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -e ".[test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (soundscape-ssl)"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/soundscape-ssl run --profile $(PROFILE) $(if $(RUN_ID),--run-id $(RUN_ID))

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean-runs:
	rm -rf runs/
