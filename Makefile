# A new user runs `make demo` and `make test`; both create .venv when it is missing.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench bench-anomalib-env bench-synthesis lint clean ui-check

install: $(STAMP)

# torch/torchvision are pinned in constraints.txt: they install from local wheels here.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

DEMO_DIR ?= demo
# The main job on the embedded default: demo data (48 good and 32 images per defect type in
# each category's test folder, so that its validation third, ~44 images, can tell a real gain
# from chance: docs/experiments.md, 2026-12-07), then a sweep of object.yaml (the anomaly
# synthesis and the foreground mask, the scoring chosen after training) over 2 categories x
# (the default + 4 searched trials), tiny preset shortened to 20 epochs, Optuna + ASHA (its
# best searched trial goes on at each rung), then the confirmation round (1 finalist and the
# default on 1 fresh seed: the demo's budget; the defaults are 2 and 2), on an in-process Ray,
# tracked in the default MLflow store (./mlflow-data, sqlite), where `pouta ui`,
# `pouta predict --model models:/...` and `pouta promote` look without flags.
# Rerunning it resumes / reprints.
demo: $(STAMP)
	test -d $(DEMO_DIR)/data/tiles || $(VENV)/bin/pouta demo-data --out $(DEMO_DIR)/data --categories 2 \
		--test-good 48 --test-defect 32
	$(VENV)/bin/pouta sweep --space object --data-root $(DEMO_DIR)/data --dataset mvtec \
		--categories tiles,pills --num-samples 4 --scheduler asha --max-concurrent 2 \
		--finalists 1 --confirm-seeds 1 \
		--preset tiny --set epochs=20 --set 'lr_milestones=[16,18]' --set eval_every=5 \
		--storage-path $(DEMO_DIR)/ray-results --name demo --resume
	@echo "Use the chosen weights by name: $(VENV)/bin/pouta predict --model models:/pouta-mvtec-tiles@challenger $(DEMO_DIR)/data/tiles/test --out $(DEMO_DIR)/predictions"

# The demo's MLflow store in a real browser (Debian's chromium driven by Playwright), with
# screenshots in bench-out/ui/. Run `make demo` first. Not part of `make test`.
ui-check: $(STAMP)
	test -x /usr/bin/chromium || (apt-get install -y -q chromium || sudo apt-get install -y -q chromium)
	$(PY) -c 'import playwright' 2>/dev/null || $(PY) -m pip install --quiet playwright
	$(PY) bench/ui_check.py

bench: $(STAMP)
	$(VENV)/bin/pouta bench model --preset paper --image-size 224 --json

# anomalib in an environment of its own, for `pouta bench synthesis --compare-anomalib` only:
# never a dependency of POUTA. Same torch as .venv (constraints.txt), so both time the same ops.
ANOMALIB_VENV ?= .venv-anomalib
bench-anomalib-env: $(ANOMALIB_VENV)/.installed
$(ANOMALIB_VENV)/.installed: constraints.txt
	test -x $(ANOMALIB_VENV)/bin/python || $(PYTHON) -m venv $(ANOMALIB_VENV)
	$(ANOMALIB_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(ANOMALIB_VENV)/bin/python -m pip install --quiet -c constraints.txt 'anomalib==2.7.0'
	touch $@

# POUTA's synthesis (batched and per-sample) against anomalib's, per core at 224 px: every
# image anomalous, with a texture folder made here (DTD-like: 40 smooth 640x480 JPEGs) and
# with procedural sources.
bench-synthesis: $(STAMP) $(ANOMALIB_VENV)/.installed
	$(PY) bench/make_textures.py bench-out/textures
	$(VENV)/bin/pouta bench synthesis --image-size 224 --compare-anomalib --anomalib-python $(ANOMALIB_VENV)/bin/python --texture-dir bench-out/textures
	$(VENV)/bin/pouta bench synthesis --image-size 224 --compare-anomalib --anomalib-python $(ANOMALIB_VENV)/bin/python

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(ANOMALIB_VENV) .pytest_cache build *.egg-info $(DEMO_DIR) bench-out
