# Two entry points for a fresh machine: `make demo` (install + main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,rollout]'
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps sglang
	touch $@

demo: install
	$(VENV)/bin/megatron-vespo demo

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	for script in benchmarks/*.py; do \
		case $$(basename $$script) in common.py|step_timing.py) ;; *) $(PY) $$script || exit 1;; esac; \
	done
