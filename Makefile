PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test corpus corpus-unlabeled ssl-gain clean

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

# Unlabeled speech for SSL (~3.2 h, ~190 voices, text never in the labeled splits; byte-for-byte
# reproducible), installing the synthesizers and the text with apt-get when they are missing.
UNLABELED_PACKAGES := espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k \
	festvox-us-slt-hts fortunes
corpus-unlabeled: data/unlabeled_corpus/train.csv

data/unlabeled_corpus/train.csv: $(VENV)/.installed recipes/synthesize_unlabeled.py
	@dpkg -s $(UNLABELED_PACKAGES) >/dev/null 2>&1 || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(UNLABELED_PACKAGES))
	$(PY) recipes/synthesize_unlabeled.py --out data/unlabeled_corpus

# SSL on the unlabeled set, then CTC on 9.1 and 2.6 labeled minutes vs from scratch, 2 seeds,
# probes, layer ranks (about 2.5 h on 2 CPU cores); table and plot in results/ssl_gain/.
ssl-gain: corpus-unlabeled
	$(PY) recipes/ssl_gain.py

clean:
	rm -rf results .pytest_cache
