# vlora: every target is a one-liner over the package. `make demo` and `make test` set up .venv when missing.
PY      := .venv/bin/python
VLORA   := .venv/bin/vlora
STAMP   := .venv/.installed
TINY    := .cache/tiny-qwen2.5-vl
DEMO    := shards/demo
NPROC   ?= 2
SRC     ?=
OUT     ?=
PACK_ARGS ?=

.PHONY: setup demo shards demo-shards tiny-model train test test-fast lint clean

setup: $(STAMP)

# torch 2.14.1 + torchvision 0.29.1 is the pair verified on these machines (see README, "Dependencies").
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -e .
	touch $@

tiny-model: $(TINY)/config.json
$(TINY)/config.json: | $(STAMP)
	$(VLORA) tiny-model --out $(TINY)

# `make shards` packs the demo set; `make shards SRC=annotations.jsonl OUT=shards/NAME/train` packs yours
# (SRC may be a folder of .json/.jsonl files; more flags: PACK_ARGS="--max-reject 0.01 --workers 4").
shards: | $(STAMP)
ifeq ($(SRC),)
	$(MAKE) demo-shards
else
	$(if $(OUT),,$(error OUT is required with SRC, e.g. make shards SRC=$(SRC) OUT=shards/NAME/train))
	$(VLORA) pack --src $(SRC) --out $(OUT) $(PACK_ARGS)
endif

demo-shards: $(DEMO)/train/manifest.json $(DEMO)/val/manifest.json
$(DEMO)/src/train.jsonl: | $(STAMP)
	$(VLORA) demo-data --out $(DEMO)/src
$(DEMO)/%/manifest.json: $(DEMO)/src/train.jsonl
	$(VLORA) pack --src $(DEMO)/src/$*.jsonl --out $(DEMO)/$* --shard-size 128

demo: $(TINY)/config.json demo-shards
	$(PY) train.py --config vlora/configs/demo.yaml

train: | $(STAMP)
	.venv/bin/torchrun --standalone --nproc_per_node $(NPROC) --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 train.py $(ARGS)

test: | $(STAMP)
	$(PY) -m pytest -q

lint: | $(STAMP)
	$(PY) -m compileall -q vlora tests train.py

clean:
	rm -rf runs $(DEMO) .cache
