# The two commands of the README: `make demo` (main job on the built-in sample data) and
# `make test`. Each creates the virtual environment (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo sweep-demo adapt-demo experiment test mutation venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(PY) pipelines/train_detectors.py --config pipelines/configs/detectors_shapes.yaml
	$(PY) pipelines/maa_augment.py --config pipelines/configs/maa_model.yaml --profile demo
	$(PY) pipelines/maa_augment.py --config pipelines/configs/maa_domain.yaml --profile demo
	$(PY) pipelines/train_detectors.py --config pipelines/configs/jrd_detectors.yaml
	$(PY) pipelines/jrd_dataset.py --config pipelines/configs/jrd_demo.yaml
	$(PY) pipelines/train_jrd_predictor.py --config pipelines/configs/jrd_predictor.yaml --profile demo
	$(PY) pipelines/train_codec.py --config pipelines/configs/codec_ugicm.yaml --profile demo
	$(PY) pipelines/evaluate.py --config pipelines/configs/evaluate.yaml --profile demo
	$(PY) -m icm.report outputs/demo outputs/train_detectors --out outputs/demo/index.html --title "icm-ray demo"

sweep-demo: $(STAMP)
	$(PY) pipelines/train_detectors.py --config pipelines/configs/detectors_shapes.yaml
	$(PY) tuning/sweep_rd.py --config tuning/configs/ugicm_rd.yaml --profile demo

adapt-demo: $(STAMP)
	$(PY) pipelines/train_detectors.py --config pipelines/configs/detectors_shapes.yaml
	$(PY) pipelines/experiments/adaptation.py --config pipelines/experiments/adaptation.yaml

experiment: $(STAMP)
	$(PY) pipelines/train_detectors.py --config pipelines/configs/detectors_shapes.yaml --profile experiment
	$(PY) pipelines/experiments/maa_generalisation.py --config pipelines/experiments/maa_generalisation.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

# Mutation score of the pure-Python core, each module against its own fast tests (bench/, not CI)
mutation: $(STAMP)
	$(PY) bench/mutation.py

clean-venv:
	rm -rf $(VENV)
