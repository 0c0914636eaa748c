# Two commands for users: `make demo` and `make test`. Both create .venv from scratch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch pinned to the versions this machine installs from local disk (CPU wheels elsewhere).
TORCH := torch==2.14.1 torchvision==0.29.1
DATA ?= data/synthetic
export OMP_NUM_THREADS ?= 2
export WANDB_SILENT ?= true

.PHONY: venv demo demo-lit compare-lit demo-minilm demo-minilm-lit demo-spurious test test-slow test-all test-slurm lint format bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

$(DATA)/train/sizes.json: | venv
	$(BIN)/fairclip-data source=synthetic out=$(DATA)

demo: venv $(DATA)/train/sizes.json
	$(BIN)/fairclip-train experiment=demo paths.data_dir=$(dir $(DATA))

# The text-bias demo (conf/experiment/demo_lit.yaml): a balanced image tower, locked; the text
# tower fine-tuned on the biased split.
BALANCED := $(dir $(DATA))synthetic_balanced
$(BALANCED)/train/sizes.json: | venv
	$(BIN)/fairclip-data source=synthetic out=$(BALANCED) "splits=[train]" synthetic.association=0.5 synthetic.male_share=0.5 synthetic.seed=7

demo-lit: venv $(DATA)/train/sizes.json $(BALANCED)/train/sizes.json
	rm -rf logs/demo_balanced logs/demo_lit  # fixed run dirs: a rerun rebuilds them
	$(BIN)/fairclip-train experiment=demo paths.data_dir=$(dir $(DATA)) data.train_shards=$(BALANCED)/train hydra.run.dir=logs/demo_balanced
	$(BIN)/fairclip-train experiment=demo_lit paths.data_dir=$(dir $(DATA)) model.pretrained=logs/demo_balanced/export/open_clip_model.safetensors hydra.run.dir=logs/demo_lit

# The LiT demo's comparison table with the published defaults (docs/results/sem_published_defaults.md)
compare-lit: venv
	$(BIN)/fairclip-debias model.name=logs/demo_lit paths.data_dir=$(dir $(DATA)) "methods=[clip,orth_proj,orth_cali,sem_i,sem_b,sem_bi]" "seeds=[0,1,2,3,4]" wandb.enabled=false hydra.run.dir=logs/demo_lit/compare

# The spurious-background demo (Waterbirds-style; README): as demo-lit, on data whose
# background colour family is named in captions and, in the biased split, tied to the
# occupation; then the debiasing table for the background attribute.
SPURIOUS := $(dir $(DATA))synthetic_spurious
SPURIOUS_BALANCED := $(dir $(DATA))synthetic_spurious_balanced
$(SPURIOUS)/train/sizes.json: | venv
	$(BIN)/fairclip-data source=synthetic out=$(SPURIOUS) synthetic.spurious_rate=0.9 synthetic.background_word_rate=0.5
$(SPURIOUS_BALANCED)/train/sizes.json: | venv
	$(BIN)/fairclip-data source=synthetic out=$(SPURIOUS_BALANCED) "splits=[train]" synthetic.association=0.5 synthetic.male_share=0.5 synthetic.seed=7 synthetic.background_word_rate=0.5

demo-spurious: venv $(SPURIOUS)/train/sizes.json $(SPURIOUS_BALANCED)/train/sizes.json
	rm -rf logs/demo_spurious_balanced logs/demo_spurious  # fixed run dirs: a rerun rebuilds them
	$(BIN)/fairclip-train experiment=demo data=synthetic_spurious paths.data_dir=$(dir $(DATA)) data.train_shards=$(SPURIOUS_BALANCED)/train trainer.max_epochs=10 hydra.run.dir=logs/demo_spurious_balanced
	$(BIN)/fairclip-train experiment=demo_lit data=synthetic_spurious paths.data_dir=$(dir $(DATA)) model.pretrained=logs/demo_spurious_balanced/export/open_clip_model.safetensors hydra.run.dir=logs/demo_spurious
	$(BIN)/fairclip-debias model.name=logs/demo_spurious/export data=synthetic_spurious paths.data_dir=$(dir $(DATA)) attribute=background sae_train.caption_samples=20000 "seeds=[0,1,2,3,4]" hydra.run.dir=logs/demo_spurious/compare

# The pretrained-text demo (conf/experiment/demo_minilm.yaml): the real all-MiniLM-L6-v2 as a
# locked text tower, the tiny image tower trained on the balanced split; then the SEM table.
demo-minilm: venv $(DATA)/train/sizes.json $(BALANCED)/train/sizes.json
	rm -rf logs/demo_minilm  # a fixed run dir: a rerun rebuilds it
	$(BIN)/fairclip-train experiment=demo_minilm paths.data_dir=$(dir $(DATA)) data.train_shards=$(BALANCED)/train hydra.run.dir=logs/demo_minilm
	$(BIN)/fairclip-debias model.name=logs/demo_minilm paths.data_dir=$(dir $(DATA)) "methods=[clip,orth_proj,sem_i,sem_b,sem_bi]" "seeds=[0,1,2,3,4]" hydra.run.dir=logs/demo_minilm/compare

# The pretrained-text LiT demo (README): demo-minilm's image tower locked, the MiniLM text
# tower fine-tuned on the biased split, then the debiasing table.
demo-minilm-lit: venv $(DATA)/train/sizes.json $(BALANCED)/train/sizes.json
	test -f logs/demo_minilm/export/open_clip_model.safetensors || $(BIN)/fairclip-train experiment=demo_minilm paths.data_dir=$(dir $(DATA)) data.train_shards=$(BALANCED)/train hydra.run.dir=logs/demo_minilm
	rm -rf logs/demo_minilm_lit  # a fixed run dir: a rerun rebuilds it
	$(BIN)/fairclip-train experiment=demo_minilm_lit paths.data_dir=$(dir $(DATA)) model.pretrained=logs/demo_minilm/export/open_clip_model.safetensors hydra.run.dir=logs/demo_minilm_lit
	$(BIN)/fairclip-debias model.name=logs/demo_minilm_lit paths.data_dir=$(dir $(DATA)) "methods=[clip,orth_proj,sem_i,sem_b,sem_bi]" "seeds=[0,1,2,3,4]" hydra.run.dir=logs/demo_minilm_lit/compare

test: venv
	$(BIN)/pytest -m "not slow" --durations=10

# the tests marked slow (multi-process DDP runs, whole demo trainings); CI runs them after `test`
test-slow: venv
	$(BIN)/pytest -m slow --durations=5

test-all: venv
	$(BIN)/pytest --durations=15

# real single-node Slurm (installs slurm-wlm + munge; root). CI=true runs these in `make test`.
test-slurm: venv
	FAIRCLIP_TEST_SLURM=1 $(BIN)/pytest -m slurm tests/test_slurm.py

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

format: venv
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) logs outputs multirun
