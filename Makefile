# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST := $(BIN)/python -m pytest

.PHONY: venv test test-slow test-all demo embedded-model fidelity parity bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first, so that nothing below pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	# the library, the training stack (train extra) and the reference implementations the tests compare with
	$(BIN)/pip install -q -e ".[train,test]"
	touch $(STAMP)

venv: $(STAMP)

# the fast suite (CI runs this); slow tests are deselected by marker. Two workers: XLA compilation
# dominates and is single-threaded, so two processes keep both cores busy.
test: $(STAMP)
	$(PYTEST) -n 2 -m "not slow" -q

# full-size models (SD-1.5 U-Net 859.5M, ControlNet 361M) on random weights; one process (memory)
test-slow: $(STAMP)
	$(PYTEST) -m slow -q

test-all: $(STAMP)
	$(PYTEST) -q

# The embedded default model (jaxcontrol/assets/): prompt + circle outline -> a PNG grid of
# condition | no control | ControlNet (| T2I-Adapter | both, when the model has one), and a CFG sweep.
demo: $(STAMP)
	$(BIN)/python infer.py --demo --output outputs/demo

# Retrain the embedded model from scratch with train.py (see configs/embedded.py and
# docs/RESULTS.md), then install the exports into jaxcontrol/assets/.
EMBEDDED_RUNS := runs/embedded
embedded-model: $(STAMP)
	for stage in vae unet controlnet adapter edit; do \
		$(BIN)/python train.py --config configs/embedded.py:$$stage --workdir $(EMBEDDED_RUNS)/$$stage || exit 1; \
	done
	$(BIN)/python -m jaxcontrol.demo install $(EMBEDDED_RUNS)

# Control fidelity and edit success of the embedded model (tables and plots in docs/RESULTS.md)
fidelity: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/control_fidelity.py --runs $(EMBEDDED_RUNS) --out docs/results
	$(BIN)/python benchmarks/edit_fidelity.py --out docs/results
	$(BIN)/python benchmarks/attention_guidance.py --out docs/results

parity: $(STAMP)
	$(BIN)/python benchmarks/parity.py --full

bench: $(STAMP)
	$(BIN)/python benchmarks/unet_speed.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
