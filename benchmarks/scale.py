"""Scale check: compression and LoRA recovery of 7B/8B-shaped models, first N blocks, random weights.

Builds a randomly initialised model with the exact shapes of a named config (``flatten_lightning.memory.SHAPES``)
keeping its first ``--layers`` blocks, saves it as a local HF directory, then measures in separate
child processes (so that one phase's peak does not carry into the next):
  compress          ``flatten_gpt`` to ``--layers - --steps`` blocks, without offload
  compress-offload  the same with ``offload=True`` (blocks visit the device one at a time)
  recover           a few LoRA steps through the Lightning pipeline (FlattenModule + LoRACallback + Trainer)
Per phase: wall time, peak host RSS (VmHWM, with glibc returning freed blocks: ``MMAP_THRESHOLD``), peak device memory on CUDA, calibration tokens/s,
the InputCache's size, a non-finite check of the weights and the logits after the phase, and the
memory model's prediction (``flatten_lightning.memory``) with its relative error. Random weights:
the point is time, memory and numerics, not quality.

    nice .venv/bin/python benchmarks/scale.py --config llama2-7b --layers 2 4 8 --intermediate-size 2752

``--intermediate-size`` overrides I for the compression runs only (recovery keeps the exact shapes):
on a CPU the eigendecomposition of the flattened MLP's 2I x 2I Gram (22016 for Llama-2-7B) takes the
better part of an hour, on a GPU seconds. Results: ``<out>/<config>.json`` (written atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere: import this checkout's packages
    sys.path.insert(0, ROOT)

from flatten_lightning import memory  # noqa: E402
from flatten_lightning.atomic import write_text_atomic  # noqa: E402
from flatten_lightning.cli import peak_rss_mb  # noqa: E402
from flatten_lightning.sources import DTYPES  # noqa: E402

MB = 2**20
# Children allocate every block of 128 KiB or more with mmap and give it back on free. glibc's default
# raises that threshold as the process frees large blocks and then keeps freed memory in its heap,
# so VmHWM counts dead tensors (measured: a 2-block LoRA step peaked at 3143 MiB by default, 2333 MiB
# with this). With it, host RSS tracks live tensors, as torch.cuda.max_memory_allocated does on a GPU.
MMAP_THRESHOLD = 128 * 1024
PHASES = ("idle", "idle-recover", "build", "compress", "compress-offload", "recover")


def hf_config(name: str, shapes: memory.Shapes, dtype: str):
    """The transformers config of ``name`` with ``shapes`` (layers possibly cut, I possibly overridden)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    def rope(theta: float) -> dict:
        return {"rope_type": "default", "rope_theta": theta}  # the published rope_theta

    common = dict(
        hidden_size=shapes.hidden,
        intermediate_size=shapes.intermediate,
        num_hidden_layers=shapes.layers,
        num_attention_heads=shapes.heads,
        num_key_value_heads=shapes.kv_heads,
        vocab_size=shapes.vocab,
        tie_word_embeddings=shapes.tied_embeddings,
        hidden_act="silu",
        dtype=dtype,
    )
    if name == "llama2-7b":
        return LlamaConfig(**common, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_parameters=rope(1e4))
    if name == "llama3-8b":
        return LlamaConfig(**common, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_parameters=rope(5e5))
    if name == "mistral-7b":
        return MistralConfig(**common, max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096, rope_parameters=rope(1e4))
    if name == "qwen1.5-7b":
        return Qwen2Config(**common, max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False, rope_parameters=rope(1e6))
    raise ValueError(f"unknown config {name!r}; choose from {', '.join(memory.SHAPES)}")


def tiny_tokenizer():
    """A word-level tokenizer (FlattenModule loads one from the directory; the ids here are random anyway)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]")


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]


def _device_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else None


def phase_build(args: argparse.Namespace) -> dict:
    """Random model of the config's shapes (first ``layers`` blocks), saved to ``model_dir``."""
    from transformers import AutoModelForCausalLM

    shapes = _shapes(args, args.intermediate_size)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    cfg = hf_config(args.config, shapes, args.dtype)
    with torch.device("cpu"):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(DTYPES[args.dtype])  # build in the target dtype: no float32 copy of 7B-wide blocks
        try:
            model = AutoModelForCausalLM.from_config(cfg)
        finally:
            torch.set_default_dtype(prev)
    model.save_pretrained(args.model_dir)
    tiny_tokenizer().save_pretrained(args.model_dir)
    return {"seconds": time.perf_counter() - t0, "params": sum(p.numel() for p in model.parameters())}


class _Meter:
    """Block-run time and tokens, and the InputCache's largest host footprint, in one compression."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.tokens, self.cache_bytes, self.cache_sets = device, 0.0, 0, 0, 0

    def install(self) -> None:
        from flatten_lightning.calibrate import BlockRunner, InputCache

        run_block, offer = BlockRunner.run_block, InputCache.offer
        meter = self

        def timed(runner, block, h, *a, **kw):
            t0 = time.perf_counter()
            out = run_block(runner, block, h, *a, **kw)
            if meter.device.type == "cuda":
                torch.cuda.synchronize(meter.device)
            meter.seconds += time.perf_counter() - t0
            meter.tokens += h.shape[0] * h.shape[1]
            return out

        def counted(cache, position, h):
            offer(cache, position, h)
            kept = [t for p, t in cache.saved.items() if p]  # position 0 (the embeddings) lives on the device
            meter.cache_sets = max(meter.cache_sets, len(kept))
            meter.cache_bytes = max(meter.cache_bytes, sum(t.numel() * t.element_size() for t in kept))

        BlockRunner.run_block, InputCache.offer = timed, counted


def phase_compress(args: argparse.Namespace, offload: bool) -> dict:
    from flatten_lightning.compress import CompressConfig, flatten_gpt
    from flatten_lightning.sources import load_model

    device = torch.device(args.device)
    model, _ = load_model(args.model_dir, DTYPES[args.dtype])
    if not offload:
        model.to(device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.calib_samples, args.calib_seqlen), generator=gen)
    meter = _Meter(device)
    meter.install()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = CompressConfig(args.layers - args.steps, batch_size=args.calib_batch, offload=offload, input_stride=args.input_stride)
    t0 = time.perf_counter()
    plan = flatten_gpt(model, ids, cfg, device=device, progress=False)
    seconds = time.perf_counter() - t0
    rss, dev = peak_rss_mb(), _device_peak_mb(device)  # before the finiteness forward below adds its own
    bad = non_finite_parameters(model)
    with torch.no_grad():
        logits = model.to(device)(input_ids=ids[:1].to(device), use_cache=False).logits
    return {
        "seconds": seconds,
        "peak_rss_mb": rss,
        "peak_device_mb": dev,
        "block_tokens_per_s": meter.tokens / meter.seconds,
        "calib_tokens_per_s": meter.tokens / meter.seconds / args.layers,  # N x T through the whole (dense) stack
        "block_runs_tokens": meter.tokens,
        "input_cache_mb": meter.cache_bytes / MB,
        "input_cache_sets": meter.cache_sets,
        "non_finite_parameters": bad,
        "logits_finite": bool(torch.isfinite(logits).all()),
        "steps": [{"members": s.members, "seconds": s.seconds} for s in plan.steps],
    }


def phase_recover(args: argparse.Namespace) -> dict:
    from lightning.pytorch import Callback
    from torch.utils.data import DataLoader

    from callbacks import LoRACallback
    from flatten_lightning.lightning import FlattenModule
    from flatten_lightning.lightning.fit import training_only_trainer

    losses: list[float] = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(outputs["loss"].item())

    gpu = args.device.startswith("cuda")
    module = FlattenModule(args.model_dir, args.dtype, lr=1e-4)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, module.model.config.vocab_size, (args.recovery_batch * args.recovery_steps, args.recovery_seqlen), generator=gen)
    precision = "bf16-true" if args.dtype == "bfloat16" else "32-true"
    trainer = training_only_trainer(args.recovery_steps, [LoRACallback(), Losses()], "gpu" if gpu else "cpu", precision)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=DataLoader(list(ids), batch_size=args.recovery_batch))
    seconds = time.perf_counter() - t0
    rss, dev = peak_rss_mb(), _device_peak_mb(torch.device(args.device))
    return {
        "seconds": seconds,
        "peak_rss_mb": rss,
        "peak_device_mb": dev,
        "train_tokens_per_s": args.recovery_batch * args.recovery_seqlen * args.recovery_steps / seconds,
        "losses": losses,
        "losses_finite": all(math.isfinite(x) for x in losses),
        "non_finite_parameters": non_finite_parameters(module.model),
    }


def _shapes(args: argparse.Namespace, intermediate: int | None) -> memory.Shapes:
    s = memory.SHAPES[args.config].with_layers(args.layers)
    return replace(s, intermediate=intermediate) if intermediate else s


def child(args: argparse.Namespace) -> None:
    """Run one phase in this process and write its record (plus the process's peak RSS) to ``--result``."""
    if args.phase == "idle":
        record: dict = {}
    elif args.phase == "idle-recover":  # the recovery child's imports, no model
        import callbacks  # noqa: F401
        import flatten_lightning.lightning  # noqa: F401

        record = {}
    elif args.phase == "build":
        record = phase_build(args)
    elif args.phase == "recover":
        record = phase_recover(args)
    else:
        record = phase_compress(args, offload=args.phase == "compress-offload")
    record.setdefault("peak_rss_mb", peak_rss_mb())
    write_text_atomic(args.result, json.dumps(record))


def run_child(args: argparse.Namespace, phase: str, **over) -> dict:
    """``phase`` in a fresh ``nice`` child process (its VmHWM starts afresh at exec)."""
    opts = {**vars(args), **over, "phase": phase}
    with tempfile.TemporaryDirectory() as tmp:
        opts["result"] = os.path.join(tmp, "result.json")
        argv = [sys.executable, os.path.abspath(__file__)]
        for k, v in opts.items():
            if v is None or isinstance(v, bool) or k in ("out", "layers_list", "phases"):
                continue
            flag = "--layers-one" if k == "layers" else f"--{k.replace('_', '-')}"
            argv += [flag, str(v)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        proc = subprocess.run(["nice", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"phase {phase} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(opts["result"]) as f:
            return json.load(f)


def predicted(args: argparse.Namespace, phase: str, layers: int, overhead_mb: float) -> memory.Peak:
    elem = DTYPES[args.dtype].itemsize
    on_cpu = not args.device.startswith("cuda")
    if phase == "recover":
        return memory.recovery_peak(
            _shapes(args, None).with_layers(layers),
            args.recovery_batch,
            args.recovery_seqlen,
            elem,
            on_cpu=on_cpu,
            overhead=overhead_mb * MB,
        )
    from flatten_lightning.compress import CompressConfig, folds_of

    return memory.compression_peak(
        _shapes(args, args.intermediate_size).with_layers(layers),
        args.calib_samples * args.calib_seqlen,
        elem,
        offload=phase == "compress-offload",
        stride=args.input_stride,
        steps=args.steps,
        on_cpu=on_cpu,
        overhead=overhead_mb * MB,
        folds=folds_of(CompressConfig(max(layers - args.steps, 1))),  # the child compresses with the defaults
    )


def main_parent(args: argparse.Namespace) -> None:
    out = os.path.join(args.out, f"{args.config}.json")
    os.makedirs(args.out, exist_ok=True)  # fail on an unwritable output before any model is built
    if args.steps < 1 or min(args.layers_list) - args.steps < 1:
        raise SystemExit(f"error: --steps {args.steps} must be >= 1 and leave at least one of the smallest --layers blocks")
    idle = {phase: run_child(args, phase, layers=1)["peak_rss_mb"] for phase in ("idle", "idle-recover")}
    rows = previous_rows(out, args) if args.append else []
    for layers in args.layers_list:
        with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
            builds = {"compress": os.path.join(tmp, "compress"), "recover": os.path.join(tmp, "recover")}
            if args.intermediate_size is None:
                builds["recover"] = builds["compress"]
            for phase in args.phases.split(","):
                role = "recover" if phase == "recover" else "compress"
                model_dir = builds[role]
                if not os.path.isdir(model_dir):
                    size = None if role == "recover" else args.intermediate_size
                    run_child(args, "build", layers=layers, model_dir=model_dir, intermediate_size=size)
                rec = run_child(args, phase, layers=layers, model_dir=model_dir)
                peak = predicted(args, phase, layers, idle["idle-recover" if phase == "recover" else "idle"])
                measured = rec["peak_device_mb"] if rec.get("peak_device_mb") is not None else rec["peak_rss_mb"]
                model_mb = (peak.device if args.device.startswith("cuda") else peak.host) / MB
                row = {"layers": layers, "phase": phase, **rec, "predicted_mb": model_mb, "error": model_mb / measured - 1.0}
                row["predicted_parts_mb"] = {k: v / MB for k, v in peak.parts.items()}
                rows = [r for r in rows if (r["layers"], r["phase"]) != (layers, phase)] + [row]
                print(
                    f"{args.config} L={layers} {phase:17s} {rec['seconds']:7.1f} s  peak {measured:8.0f} MiB  "
                    f"model {model_mb:8.0f} MiB ({row['error']:+.1%})",
                    flush=True,
                )
                write_text_atomic(
                    out, json.dumps({"args": vars(args), "idle_rss_mb": idle, "threads": torch.get_num_threads(), "rows": rows}, indent=2)
                )
    print(f"wrote {out}")
    print_table(out)
    print_predictions()


def print_table(path: str) -> None:
    """The measured rows of ``path`` beside the memory model's figures (recomputed with the current model)."""
    with open(path) as f:
        run = json.load(f)
    args = argparse.Namespace(**run["args"])
    print(
        f"\n{args.config}, {args.dtype}, {args.device}, {run['threads']} threads; compression: I = {args.intermediate_size or 'published'}, ",
        end="",
    )
    print(
        f"{args.calib_samples} x {args.calib_seqlen} calibration tokens, {args.steps} merge step(s); recovery: {args.recovery_steps} LoRA steps of ",
        end="",
    )
    print(f"{args.recovery_batch} x {args.recovery_seqlen} tokens, published shapes\n")
    print("| blocks | phase | wall s | tokens/s | InputCache MiB | peak RSS MiB | peak device MiB | model MiB | error | finite |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(run["rows"], key=lambda r: (r["phase"], r["layers"])):
        idle = run["idle_rss_mb"]["idle-recover" if r["phase"] == "recover" else "idle"]
        peak = predicted(args, r["phase"], r["layers"], idle)
        model_mb = (peak.device if args.device.startswith("cuda") else peak.host) / MB
        measured = r["peak_device_mb"] if r.get("peak_device_mb") is not None else r["peak_rss_mb"]
        finite = not r["non_finite_parameters"] and r.get("logits_finite", r.get("losses_finite"))
        speed = r.get("calib_tokens_per_s", r.get("train_tokens_per_s"))
        cache = f"{r['input_cache_mb']:.0f}" if "input_cache_mb" in r else "-"
        device = f"{r['peak_device_mb']:.0f}" if r.get("peak_device_mb") is not None else "-"
        print(
            f"| {r['layers']} | {r['phase']} | {r['seconds']:.0f} | {speed:.0f} | {cache} | {r['peak_rss_mb']:.0f} | {device} | "
            f"{model_mb:.0f} | {model_mb / measured - 1:+.1%} | {'yes' if finite else 'NO'} |"
        )


def previous_rows(path: str, args: argparse.Namespace) -> list[dict]:
    """Rows of an earlier run of the same config and settings (``--append``), to add other depths or phases to."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        old = json.load(f)
    keys = ("config", "dtype", "device", "intermediate_size", "calib_samples", "calib_seqlen", "calib_batch", "input_stride", "steps")
    keys += ("recovery_steps", "recovery_batch", "recovery_seqlen")
    differ = [k for k in keys if old["args"].get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"error: --append to {path}, which was run with other settings ({', '.join(differ)}). Fix: use another --out.")
    return old["rows"]


def print_predictions() -> None:
    """The memory model's figures for the full models with the paper's calibration (128 x 2048 tokens), default settings."""
    from flatten_lightning.compress import CompressConfig, folds_of

    folds = folds_of(CompressConfig(25))  # per-fold statistics of the default ridge rule (cross-validation)
    print("\n| model | phase | 1 GPU device GB | 1 GPU offload device GB | 8 GPU (DDP) device GB/rank | host GB/rank (offload) |")
    print("|---|---|---|---|---|---|")
    for name, shapes in memory.SHAPES.items():
        one = memory.compression_peak(shapes, 128 * 2048, steps=7, folds=folds)
        off = memory.compression_peak(shapes, 128 * 2048, offload=True, steps=7, folds=folds)
        eight = memory.compression_peak(shapes, 16 * 2048, steps=7, folds=folds)
        print(
            f"| {name} | compress 32->25 | {one.device / 1e9:.1f} | {off.device / 1e9:.1f} | {eight.device / 1e9:.1f} | {off.host / 1e9:.1f} |"
        )
        rec = memory.recovery_peak(shapes.with_layers(25), 8, 512)
        rec8 = memory.recovery_peak(shapes.with_layers(25), 4, 512)
        print(f"| {name} | LoRA 25 layers | {rec.device / 1e9:.1f} (8x512) | - | {rec8.device / 1e9:.1f} (4x512) | - |")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=list(memory.SHAPES), default="llama2-7b")
    p.add_argument("--layers", dest="layers_list", type=int, nargs="+", default=[2, 4, 8], help="keep the first N blocks (one run per N)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--intermediate-size", type=int, default=None, help="override I for compression (CPU: eigh of 2I x 2I is cubic)")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration windows N (paper: 128)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per window T (paper: 2048)")
    p.add_argument("--calib-batch", type=int, default=4, help="calibration windows per forward")
    p.add_argument("--input-stride", type=int, default=None, help="InputCache stride (default ceil(sqrt(depth)))")
    p.add_argument("--steps", type=int, default=1, help="merge steps (compress to layers - steps)")
    p.add_argument("--recovery-steps", type=int, default=3)
    p.add_argument("--recovery-batch", type=int, default=2)
    p.add_argument("--recovery-seqlen", type=int, default=256)
    p.add_argument("--phases", default="compress,compress-offload,recover", help="comma-separated, from " + ", ".join(PHASES[3:]))
    p.add_argument("--timeout", type=int, default=1800, help="seconds per child phase")
    p.add_argument("--out", default="runs/scale")
    p.add_argument("--append", action="store_true", help="keep the rows of an earlier run with the same settings in <out>/<config>.json")
    p.add_argument("--table", action="store_true", help="print <out>/<config>.json beside the current memory model and exit")
    p.add_argument("--predict-only", action="store_true", help="print the memory model's figures for the full models and exit")
    # Child-process options (set by the parent).
    p.add_argument("--phase", choices=PHASES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--layers-one", dest="layers", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.predict_only:
        print_predictions()
    elif args.table:
        print_table(os.path.join(args.out, f"{args.config}.json"))
    elif args.phase is not None:
        child(args)
    else:
        bad = [p for p in args.phases.split(",") if p not in PHASES[3:]]
        if bad:
            raise SystemExit(f"error: unknown phase(s) {bad}; choose from {', '.join(PHASES[3:])}")
        main_parent(args)


if __name__ == "__main__":
    main()
