# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: run test venv bench clean

venv: $(STAMP)

$(STAMP): requirements.lock scripts/setup_env.sh pyproject.toml
	bash scripts/setup_env.sh $(PYTHON) $(VENV)
	touch $(STAMP)

run: $(STAMP)
	$(PY) main.py $(ARGS)

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) benchmarks/render.py

clean:
	rm -rf $(VENV)
