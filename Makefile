# Two entry points for a fresh machine: `make demo` (install + main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test bench slurm-local gpu-check
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,rollout]'
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps sglang
	touch $@

demo: install
	$(VENV)/bin/megatron-vespo train configs/tiny_moe_cpu.yaml

# Slurm 22.05 + munge from Debian for the local emulated cluster in tests/test_slurm.py; installed
# only where it is missing and we are root (elsewhere those tests skip and say why).
slurm-local:
	@if ! command -v slurmctld >/dev/null && [ ! -x /usr/sbin/slurmctld ] && [ "$$(id -u)" = 0 ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq slurm-wlm slurmctld slurmd slurm-client munge >/dev/null; \
	fi

test: install slurm-local
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

# On a bare CUDA machine (nothing installed from the network; see the script's header for the one
# wheel to carry): the GPU path in one table, in minutes.
gpu-check:
	python3 benchmarks/gpu_check.py

bench: install
	for script in benchmarks/*.py; do \
		case $$(basename $$script) in common.py|step_timing.py|gpu_check.py) ;; *) $(PY) $$script || exit 1;; esac; \
	done
