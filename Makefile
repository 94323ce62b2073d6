# Two commands do all set-up: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PATHLOOP := $(VENV)/bin/pathloop
DEMO ?= demo-workspace
DEMO_HE ?= demo-he-workspace
DEMO_STEPS ?= 450
DEMO_HOST ?= 127.0.0.1
DEMO_PORT ?= 8501
# torch and torchvision first and pinned: on this lab's machines they install from local disk,
# and letting the resolver pick one would fetch a multi-GB CUDA build.
TORCH := torch==2.14.1 torchvision==0.29.1
# pip, with the one line per package that a lab machine's pip.conf earns for index folders it
# does not have ("Location ... is ignored") and setuptools' notice on every editable install
# left out; pip's own exit status is kept.
SHELL := /bin/bash
EXTRAS := dev,postgres
PIP = echo "pip install $(1)"; set -o pipefail; PYTHONWARNINGS="ignore:Editable installation:UserWarning" \
	$(PY) -m pip install --quiet --disable-pip-version-check $(1) 2>&1 \
	| { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; }
STAMP := $(VENV)/.installed

STUDY ?= study
STUDY_ARGS ?=

.PHONY: demo demo-he bench-expert test install lint study study-seeds $(STUDY_TARGETS) bench-ingest bench-loader bench-generator bench-queue bench-reward bench-finetune clean-demo

$(PY):
	$(PYTHON) -m venv $(VENV)
	@$(call PIP,--upgrade pip)

$(STAMP): pyproject.toml | $(PY)
	@$(call PIP,$(TORCH))
	@$(call PIP,-e '.[$(EXTRAS)]')
	@# Real H&E images for `demo-slide --stain he-real` and `--stain he-tia`: the JPEG in stardist's
	@# wheel and the PNG in tiatoolbox's, each without its dependencies (numba, csbdeep; tiatoolbox
	@# pins an older torch), which pathloop does not use: it reads the image file, never imports them.
	@$(call PIP,--no-deps stardist==0.9.2 tiatoolbox==2.1.3)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@test -f $(DEMO)/pathloop.toml || $(PATHLOOP) init $(DEMO) --classes dab_negative,dab_positive --tile-size 32
	$(PATHLOOP) db upgrade --workspace $(DEMO)
	@mkdir -p $(DEMO)/slides
	$(PATHLOOP) demo-slide $(DEMO)/slides/ihc.tiff
	$(PATHLOOP) ingest --workspace $(DEMO) $(DEMO)/slides/ihc.tiff --regions $(DEMO)/slides/ihc.geojson --stride 16
	@# A CPU pretraining of the tiny preset (about 3 minutes on 2 cores); skipped once done.
	@$(PATHLOOP) generator list --workspace $(DEMO) | grep -q pretrained || \
		$(PATHLOOP) pretrain --workspace $(DEMO) --preset tiny --steps $(DEMO_STEPS) --batch-size 32 \
			--lr 1e-3 --train-lr-warmup-steps 20 --checkpoint-every 50 --run-name demo-pretrain --resume auto
	@# One round of the loop, rated by two simulated experts (pathloop/simulate.py): the round
	@# generates 16 tiles per class, the raters judge each, the reward model learns their verdicts;
	@# the round then waits at fine-tuning for `pathloop round --workspace $(DEMO)`. Done once.
	@# DDPM (ancestral) sampling: from this briefly trained model, DDIM leaves pixel noise.
	@if $(PATHLOOP) round status --workspace $(DEMO) | grep -q "no rounds yet"; then set -e; \
		$(PATHLOOP) round --workspace $(DEMO) --per-class 16 --sampler ddpm --sample-steps 100 \
			--reward-epochs 20 --finetune-steps 150 --finetune-lr 1e-5 --finetune-lr-schedule cosine --objective preference --preference-beta 5000 --beta 300 \
			--select-every 25 --select-per-class 16 --select-patience 2 \
			--eval-per-class 16; \
		$(PATHLOOP) simulate-expert --workspace $(DEMO) --raters 2 --noise 0.05; \
		$(PATHLOOP) round --workspace $(DEMO) --step awaiting_ratings; \
		$(PATHLOOP) round --workspace $(DEMO) --step training_reward; fi
	@# More tiles, outside the round, for a newcomer to rate in the browser.
	$(PATHLOOP) generate --workspace $(DEMO) --model latest --per-class 16 --sampler ddpm --steps 100 --seed 0
	@test -d $(DEMO)/evaluations || $(PATHLOOP) evaluate --workspace $(DEMO) --model latest --per-class 32 \
		--sampler ddpm --steps 100 --simulated-expert
	$(PATHLOOP) status --workspace $(DEMO)
	$(PATHLOOP) round status --workspace $(DEMO)
	@# Demo accounts: created once, passwords regenerated and printed on every run.
	@for pair in admin:admin rater:annotator; do name=$${pair%%:*}; role=$${pair##*:}; \
		if $(PATHLOOP) users list --workspace $(DEMO) | grep -q "^$$name "; then \
			$(PATHLOOP) users password $$name --generate-password --workspace $(DEMO); \
		else $(PATHLOOP) users add $$name --role $$role --generate-password --workspace $(DEMO); fi; done
	$(PATHLOOP) annotate --workspace $(DEMO) --host $(DEMO_HOST) --port $(DEMO_PORT)

# The H&E workspace (recoloured IHC, nuclei_dense/stroma regions; see README), tiled as the demo.
demo-he: $(STAMP)
	@test -f $(DEMO_HE)/pathloop.toml || $(PATHLOOP) init $(DEMO_HE) --classes nuclei_dense,stroma --tile-size 32
	$(PATHLOOP) db upgrade --workspace $(DEMO_HE)
	@mkdir -p $(DEMO_HE)/slides
	$(PATHLOOP) demo-slide --stain he $(DEMO_HE)/slides/he.tiff
	$(PATHLOOP) ingest --workspace $(DEMO_HE) $(DEMO_HE)/slides/he.tiff --regions $(DEMO_HE)/slides/he.geojson --stride 16

bench-expert: $(STAMP)
	$(PY) -m benchmarks.simulated_expert

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check store annotate_app reward finetune pathloop tests benchmarks

# The loop study (benchmarks/loop_study.py): loop vs control from a fresh generator, one seed each at
# 2 rounds on the IHC demo slide and on the real H&E field (he-tia); results in $(STUDY)/<slide>.
# The two slides run side by side, one process and STUDY_THREADS torch threads each (so each slide
# has a core of its own on a 2-core machine). study-seeds: three seeds each, with the gain's
# interval over seeds. STUDY_SLIDES="ihc he" for the recoloured H&E instead (any of ihc, he,
# he-real, he-tia; study-<slide> and study-seeds-<slide> run one), STUDY_ARGS="--compare
# kto,weighted" etc. for other settings; the README's "The loop study" has the measured times.
STUDY_SLIDES ?= ihc he-tia
STUDY_SETTINGS := --rounds 2 --eval-per-class 48
STUDY_THREADS ?= 1
STUDY_RUN = OMP_NUM_THREADS=$(STUDY_THREADS) MKL_NUM_THREADS=$(STUDY_THREADS) $(PY) benchmarks/loop_study.py
STUDY_ALL := ihc he he-real he-tia
STUDY_TARGETS := $(STUDY_ALL:%=study-%) $(STUDY_ALL:%=study-seeds-%)
study: $(STAMP)
	$(MAKE) -j2 --output-sync=target $(STUDY_SLIDES:%=study-%)
$(STUDY_ALL:%=study-%): $(STAMP)
	$(STUDY_RUN) --slide $(@:study-%=%) --out $(STUDY)/$(@:study-%=%) $(STUDY_SETTINGS) $(STUDY_ARGS)

study-seeds: $(STAMP)
	$(MAKE) -j2 --output-sync=target $(STUDY_SLIDES:%=study-seeds-%)
$(STUDY_ALL:%=study-seeds-%): $(STAMP)
	$(STUDY_RUN) --slide $(@:study-seeds-%=%) --seeds 3 --out $(STUDY)/$(@:study-seeds-%=%)-seeds \
		$(STUDY_SETTINGS) $(STUDY_ARGS)

bench-ingest: $(STAMP)
	$(PY) benchmarks/ingest.py

bench-loader: $(STAMP)
	$(PY) benchmarks/loader.py

bench-generator: $(STAMP)
	$(PY) benchmarks/generator.py

bench-queue: $(STAMP)
	$(PY) benchmarks/queue.py

bench-reward: $(STAMP)
	$(PY) benchmarks/reward.py

bench-finetune: $(STAMP)
	$(PY) benchmarks/finetune.py

clean-demo:
	rm -rf $(DEMO)
