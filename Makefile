PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test corpus clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# SSL pretraining of the causal Conformer on the shipped corpus; last line is a JSON summary.
demo: install
	$(PY) recipes/train.py hparams/SSL/conformer.yaml

test: install
	$(PY) -m pytest -q tests

# Regenerates data/espeak_corpus (needs: apt-get install espeak-ng dict-devil).
corpus: install
	$(PY) recipes/synthesize_corpus.py --out data/espeak_corpus

clean:
	rm -rf results .pytest_cache
