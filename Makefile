# vlora: every target is a one-liner over the package. `make demo` and `make test` set up .venv when missing.
PY      := .venv/bin/python
VLORA   := .venv/bin/vlora
STAMP   := .venv/.installed
# FAMILY=qwen2_vl|qwen2_5_vl|qwen3_vl|qwen3_5 picks the tiny model of `make demo` / `make tiny-model`
# (vlora/families); its folder is .cache/tiny-qwen2.5-vl for qwen2_5_vl, and so on.
FAMILY  ?= qwen2_5_vl
TINY    := .cache/tiny-$(subst _,-,$(subst 2_5,2.5,$(subst 3_5,3.5,$(FAMILY))))
# The demo images are 112 px boards of 28 px cells; at 32 px per token (Qwen3-VL, Qwen3.5) they are resized to
# 128 px, so that each cell is still one image token.
DEMO_ARGS := model.path=$(TINY) $(if $(filter qwen2_5_vl,$(FAMILY)),,run.name=demo-$(FAMILY)) \
             $(if $(filter qwen3%,$(FAMILY)),data.max_pixels=16384)
DEMO    := shards/demo
NPROC   ?= 2
SRC     ?=
OUT     ?=
PACK_ARGS ?=

.PHONY: setup demo shards demo-shards tiny-model train slurm-demo bench gpu-wheels test test-fast lint clean

setup: $(STAMP)

# torch 2.14.1 + torchvision 0.29.1 is the pair verified on these machines (see README, "Dependencies").
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -e '.[test]'
	touch $@

tiny-model: $(TINY)/config.json
$(TINY)/config.json: vlora/tiny.py vlora/families/$(FAMILY).py | $(STAMP)
	$(VLORA) tiny-model --family $(FAMILY) --out $(TINY)

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

# Train, then score the adapter against the base before fine-tuning and the majority answer (runs/demo/eval/;
# run.report_samples does in the same process what `vlora eval` does). The tiny model and the demo shards are built
# side by side: each step is mostly a Python start on one core.
demo: | $(STAMP)
	$(MAKE) --no-print-directory -j2 $(TINY)/config.json demo-shards
	$(PY) train.py --config vlora/configs/demo.yaml $(DEMO_ARGS)

train: | $(STAMP)
	.venv/bin/torchrun --standalone --nproc_per_node $(NPROC) --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 train.py $(ARGS)

# `make slurm-demo`: the demo run as a batch job (launch/slurm.sbatch, one node, NPROC processes) on whichever
# Slurm `sbatch` finds (SLURM_CONF names a cluster); follows the job's log until the job leaves the queue.
# Nodes without GPUs get --gpus-per-node=0; SLURM_ARGS adds sbatch options, ARGS config overrides.
slurm-demo: $(TINY)/config.json demo-shards
	@mkdir -p runs
	@if sinfo -h -o %G | grep -q gpu; then res="--gpus-per-node=$(NPROC)"; else res="--gpus-per-node=0"; fi; \
	job=$$(GPUS_PER_NODE=$(NPROC) sbatch --parsable --nodes=1 $$res --cpus-per-task=$(NPROC) \
	  --job-name=vlora-demo --output=runs/slurm-demo-%j.out $(SLURM_ARGS) launch/slurm.sbatch run.name=slurm-demo $(ARGS)) \
	  || exit 1; job=$${job%%;*}; log=runs/slurm-demo-$$job.out; echo "job $$job ($$res): $$log"; \
	tail -n +1 -F $$log 2>/dev/null & tailer=$$!; \
	while [ -n "$$(squeue -h -j $$job 2>/dev/null)" ]; do sleep 2; done; sleep 1; kill $$tailer; \
	state=$$(scontrol show job -o $$job | grep -oE '(JobState|Restarts|ExitCode)=[^ ]*' | tr '\n' ' '); \
	echo "job $$job: $$state"; case "$$state" in JobState=COMPLETED*) ;; *) exit 1;; esac

# `make bench`: vlora's step beside the usual HF Trainer recipe on the tiny 3B-structure model with the real vocabulary
# (operator calls, FLOPs, tokens/s; docs/speed.md). ARGS="--model 7b --batch 8" for other models and shapes.
bench: | $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(VLORA) bench --model tiny-3b --reference --check $(ARGS)

# `make gpu-wheels`: the wheels a lent GPU machine lacks for `launch/bench_gpu.sh` (its CARRY list, at .venv's
# versions, for its CPython 3.12) into .whl/, which the device call carries; fails over 60 MiB (docs/speed.md).
gpu-wheels: | $(STAMP)
	$(PY) -m pip install -q -e '.[bench,gpu]'
	PYTHON=$(PY) bash launch/bench_gpu.sh wheels

test: | $(STAMP)
	$(PY) -m pytest -q

# The quick loop while editing: everything but the multi-process and end-to-end runs (marked slow).
test-fast: | $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: | $(STAMP)
	$(PY) -m compileall -q vlora tests train.py

clean:
	rm -rf runs $(DEMO) .cache
