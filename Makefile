# megarl developer entry points. Everything installs what it needs (idempotently) first.
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup setup-gpu gpu-smoke-bundle test test-fast test-dist test-slurm demo lint bench lock clean

setup:  ## create .venv with the pinned CPU stack (a no-op when requirements are unchanged)
	@bash tools/setup_env.sh $(VENV)

setup-gpu:  ## .venv-gpu with the GPU stack (requirements/gpu.txt); needs NVIDIA GPUs; not yet run by this project
	@bash tools/setup_gpu_env.sh .venv-gpu

gpu-smoke-bundle: setup  ## runs/gpu_smoke: what tools/gpu_smoke.py needs on a torch-only GPU machine (then: python tools/gpu_smoke.py)
	$(PY) tools/gpu_smoke.py prepare

test: setup  ## the whole suite
	$(PY) -m pytest -q

test-fast: setup  ## everything but the multi-process distributed tests
	$(PY) -m pytest -q -m "not dist"

test-dist: setup  ## only the multi-process gloo tests
	$(PY) -m pytest -q -m dist

test-slurm: setup  ## only the launcher tests on a local Slurm cluster (root: installs slurm via apt-get)
	$(PY) -m pytest -q -m slurm

demo: setup  ## the main job that exists today (see README)
	$(PY) examples/demo.py $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup  ## benchmarks; each prints one JSON object on its last line
	@set -e; found=0; for b in bench/[!_]*.py; do [ -e "$$b" ] || continue; found=1; \
	  echo "== $$b"; $(PY) $$b; done; [ $$found = 1 ] || echo "no benchmarks yet"

lock:  ## re-resolve requirements/cpu.in into requirements/cpu.txt
	bash tools/lock_requirements.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
