# Two entry points (see README): `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-recovery bench-scale compare clean

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

# The README's results table: SmolLM2 30 -> 24, FlattenGPT vs ShortGPT, 32 x 512 calibration, 8 x 2048 held out.
bench: $(STAMP)
	$(BIN)/python benchmarks/flatten_vs_shortgpt.py --calib-samples 32 --eval-windows 8 --methods flatten,shortgpt

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

clean:
	rm -rf $(VENV) runs
