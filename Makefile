# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := data/fashion-mnist

.PHONY: venv demo test fashion-mnist chromium clean

venv: $(STAMP)

# torch/torchvision first and pinned: on the reference machine they come from local disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Debian ships Fashion-MNIST; install it when we can (root), else pipe falls back to torchvision's download.
fashion-mnist:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	    echo "dataset-fashion-mnist could not be installed; falling back to torchvision's download"; \
	  else echo "not root: cannot apt-get dataset-fashion-mnist; falling back to torchvision's download"; fi; \
	fi

# The report's test renders it in headless Chromium (Debian's chromium); without one that test is skipped and says why.
chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } || \
	    echo "chromium could not be installed; the browser tests of pipe report will be skipped"; \
	  else echo "not root: cannot apt-get chromium; the browser tests of pipe report will be skipped"; fi; \
	fi

demo: venv fashion-mnist
	$(BIN)/pipe make-dataset fashion-mnist $(DEMO_DATA)
	$(BIN)/pipe extract $(DEMO_DATA) --model efficientnet_lite0 --out cache/features.h5
	$(BIN)/pipe train-head cache/features.h5
	$(BIN)/pipe evaluate
	$(BIN)/pipe report

test: venv chromium
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) cache/*.h5 cache/*.pt cache/*.json cache/*.parts cache/*.lock data
