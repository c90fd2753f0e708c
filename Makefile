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

# SSL pretraining on the shipped corpus (ENCODER=conformer or conmamba); last line: JSON summary.
ENCODER ?= conformer
demo: install
	$(PY) recipes/train.py hparams/SSL/$(ENCODER).yaml

test: install
	$(PY) -m pytest -q tests --doctest-modules modules

# Regenerates data/espeak_corpus (needs: apt-get install espeak-ng dict-devil).
corpus: install
	$(PY) recipes/synthesize_corpus.py --out data/espeak_corpus

clean:
	rm -rf results .pytest_cache
