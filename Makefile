PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test corpus corpus-labeled lm-text corpus-downstream ssl-curve recognizer kenlm clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .  # `modules` importable anywhere
	touch $@

# SSL pretraining, CTC fine-tuning and evaluation on the shipped corpus (ENCODER=conformer or
# conmamba); the last line is a JSON summary.
ENCODER ?= conformer
demo: install
	$(PY) recipes/demo.py --encoder $(ENCODER)

test: install
	$(PY) -m pytest -q --durations=15 tests --doctest-modules modules recipes/stats.py

# Regenerates data/espeak_corpus (needs: apt-get install espeak-ng dict-devil).
corpus: install
	$(PY) recipes/synthesize_corpus.py --out data/espeak_corpus

# The labeled benchmark (~9 h: unlabeled ~5 h, labeled train ~3 h with nested 10 min / 30 min /
# 1 h subsets, dev and test of 480 utterances from 24 voices each; voices and sentences disjoint
# between them; byte-for-byte reproducible), installing the synthesizers and the text with
# apt-get when they are missing (recipes/synthesize_benchmark.py).
BENCHMARK_PACKAGES := espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k \
	festvox-us-slt-hts fortunes
corpus-labeled: data/benchmark/test.csv

data/benchmark/test.csv: $(VENV)/.installed recipes/synthesize_benchmark.py
	@dpkg -s $(BENCHMARK_PACKAGES) >/dev/null 2>&1 || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BENCHMARK_PACKAGES))
	$(PY) recipes/synthesize_benchmark.py --out data/benchmark

# More LM text for the benchmark (recipes/prepare_lm_text.py): the corpus's unspoken sentences
# and the English fortune files and Dhammapada of Debian packages, none of them a dev or test
# sentence or a near copy of one; and a word list for the word LM's lexicon
# (/usr/share/dict/american-english: hparams/LM/word_ngram.yaml --word_list).
LM_TEXT_PACKAGES := fortunes fortune-anarchism display-dhammapada wamerican
lm-text: data/benchmark/lm_extra.csv

data/benchmark/lm_extra.csv: data/benchmark/test.csv recipes/prepare_lm_text.py
	@dpkg -s $(LM_TEXT_PACKAGES) >/dev/null 2>&1 || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(LM_TEXT_PACKAGES))
	$(PY) recipes/prepare_lm_text.py --corpus data/benchmark --out $@

# Keyword spotting (12 classes) and intent (8 classes) corpora spoken by the benchmark's voices,
# by partition (recipes/synthesize_downstream.py); ~10 min on 2 cores.
corpus-downstream: data/downstream/intent/test.csv

data/downstream/intent/test.csv: data/benchmark/test.csv recipes/synthesize_downstream.py
	$(PY) recipes/synthesize_downstream.py --out data/downstream

# Does SSL pay off? The low-resource curve on the benchmark (recipes/ssl_curve.py): SSL-init vs
# scratch at 10 min, 1 h and all labeled data, each arm tuned on dev, seeds, intervals, bootstrap.
# Hours of CPU; resumable (run it again to go on); results/ssl_curve/benchmark/curve.{md,png}.
ssl-curve: corpus-labeled
	$(PY) recipes/ssl_curve.py hparams/curves/benchmark.yaml

# The reference recognizer: the curve's topline recipe (CTC from scratch on all labeled benchmark
# data, the SSL encoder's sizes; 9 epochs = 3,321 steps; lr 0.002 without SpecAugment, the
# scratch arm's dev choice at 1 hour), fine-tuning seed 1, validated on all of dev and tested on
# the benchmark's test split (the curve's topline runs test on dev; this decode is one more read
# of test, so make it after the curve's report); resumable. Its last line is JSON with
# ctc_hparams and ctc_output_folder, for recipes/evaluate.py.
recognizer: corpus-labeled
	$(PY) recipes/train.py hparams/CTC/conformer_small.yaml --d_model 144 --nhead 4 \
		--num_encoder_layers 6 --d_ffn 576 --kernel_size 15 --subsampling_conv_channels 64 \
		--data_folder data/benchmark --train_csv data/benchmark/train.csv \
		--valid_csv data/benchmark/dev.csv --test_csv data/benchmark/test.csv \
		--tokenizer_csv data/benchmark/train.csv --number_of_epochs 9 --batch_size 8 --seed 1 \
		--lr_encoder 0.002 --lr_head 0.002 --spec_augment_prob 0.0 --beam_size 1 \
		--warmup_fraction 0.1 --head_only_fraction 0.0 --output_folder results/recognizer

# The optional n-gram LM (hparams/LM/ngram.yaml): KenLM's lmplz and build_binary, built from the
# kenlm sdist of the package index into tools/kenlm/bin (cmake, g++ and Boost from apt-get when
# missing), and its Python module into the venv. About 3 min on 2 cores.
KENLM_PACKAGES := cmake g++ libboost-program-options-dev libboost-system-dev \
	libboost-thread-dev libboost-test-dev zlib1g-dev libbz2-dev liblzma-dev
kenlm: tools/kenlm/bin/lmplz

tools/kenlm/bin/lmplz: $(VENV)/.installed requirements-ngram.txt
	@dpkg -s $(KENLM_PACKAGES) >/dev/null 2>&1 || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(KENLM_PACKAGES))
	$(PY) -m pip install --quiet -r requirements-ngram.txt
	rm -rf tools/kenlm/src && mkdir -p tools/kenlm/src tools/kenlm/bin
	$(PY) -m pip download --quiet --no-deps --no-binary :all: -d tools/kenlm/src \
		$$(grep -o 'kenlm==[0-9.]*' requirements-ngram.txt)
	tar -xzf tools/kenlm/src/kenlm-*.tar.gz -C tools/kenlm/src
	cmake -S tools/kenlm/src/kenlm-*/ -B tools/kenlm/src/build -DCMAKE_BUILD_TYPE=Release >/dev/null
	$(MAKE) -C tools/kenlm/src/build -j2 lmplz build_binary >/dev/null
	cp tools/kenlm/src/build/bin/lmplz tools/kenlm/src/build/bin/build_binary tools/kenlm/bin/

clean:
	rm -rf results .pytest_cache
