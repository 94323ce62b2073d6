# Two commands do all set-up: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PATHLOOP := $(VENV)/bin/pathloop
DEMO ?= demo-workspace
# torch and torchvision first and pinned: on this lab's machines they install from local disk,
# and letting the resolver pick one would fetch a multi-GB CUDA build.
TORCH := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test install lint bench-ingest clean-demo

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@test -f $(DEMO)/pathloop.toml || $(PATHLOOP) init $(DEMO) --classes dab_negative,dab_positive --tile-size 32
	@mkdir -p $(DEMO)/slides
	$(PATHLOOP) demo-slide $(DEMO)/slides/ihc.tiff
	$(PATHLOOP) ingest --workspace $(DEMO) $(DEMO)/slides/ihc.tiff --regions $(DEMO)/slides/ihc.geojson --stride 16
	$(PATHLOOP) status --workspace $(DEMO)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check store annotate_app reward finetune pathloop tests benchmarks

bench-ingest: $(STAMP)
	$(PY) benchmarks/ingest.py

clean-demo:
	rm -rf $(DEMO)
