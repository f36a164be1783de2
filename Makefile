# μOmni: `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo course test lab clean

# Create the virtual environment and install the project once; redone only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/muomni demo

# The demo, then the course's full tiny model in runs/tiny-course (about an hour more on two cores).
course: $(STAMP)
	$(BIN)/muomni course

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q --nbval-lax --nbval-current-env --nbval-cell-timeout=300 notebooks/

lab: $(STAMP)
	$(BIN)/python -m ipykernel install --user --name muomni --display-name "Python (μOmni)"
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) data runs demo_out .pytest_cache
