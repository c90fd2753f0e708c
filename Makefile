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

# SSL pretraining, CTC fine-tuning and evaluation on the shipped corpus (ENCODER=conformer or
# conmamba); the last line is a JSON summary.
ENCODER ?= conformer
demo: install
	$(PY) recipes/demo.py --encoder $(ENCODER)

test: install
	$(PY) -m pytest -q tests --doctest-modules modules

# Regenerates data/espeak_corpus (needs: apt-get install espeak-ng dict-devil).
corpus: install
	$(PY) recipes/synthesize_corpus.py --out data/espeak_corpus

clean:
	rm -rf results .pytest_cache
