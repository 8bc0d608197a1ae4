# Two commands matter: `make demo` (the main job) and `make test`. Both install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build lies on local disk here; override for a GPU machine, e.g. TORCH_SPEC='torch==2.13.0 --index-url ...'
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,oracle,lm-eval,search,serve,ray,fast
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test test-slow test-ray lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(VENV)/bin/evomerge demo --out runs/demo

test: install
	$(PY) -m pytest -q -n 2 -m "not slow and not gpu and not ray"

test-slow: install
	$(PY) -m pytest -q -n 2 -m "slow and not gpu and not ray"

# The Ray backend's tests start one local Ray instance (2 CPUs) per test module: no xdist workers.
test-ray: install
	$(PY) -m pytest -q -m "ray and not gpu"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
