# Two commands on a fresh machine:  `make quickstart`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast quickstart notebooks lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

# Everything, slow end-to-end tests included (this is what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -q

# Unit tests only.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Built-in shapes shards -> tiny autoencoder -> latent cache -> tiny text-to-image LDM -> samples + adherence scores.
quickstart: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python scripts/quickstart.py

# Execute notebooks/*.ipynb in place, outputs (figures) kept, for committing. sampling.ipynb loads the quickstart's
# LDM, so in a fresh clone this first runs `make quickstart` (about 15 min on a 2-core CPU).
notebooks: $(STAMP) outputs/quickstart/ldm/done
	$(BIN)/python scripts/execute_notebooks.py

outputs/quickstart/ldm/done: | $(STAMP)
	$(MAKE) quickstart

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/data_throughput.py
	$(BIN)/python bench/autoencoder_step.py
	$(BIN)/python bench/sample_throughput.py
	$(BIN)/python bench/stage2_step.py
	$(BIN)/python -m torch.distributed.run --standalone --nproc_per_node=2 bench/sharding_memory.py

clean:
	rm -rf outputs multirun wandb .pytest_cache
