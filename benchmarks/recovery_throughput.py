"""LoRA recovery throughput: the Lightning pipeline vs a plain PyTorch + peft loop, in one run.

Both loops train the same model with the same adapters (``LoraSpec``, same initialisation seed), the
same AdamW, the same per-step dropout seeds and the same training windows in the same order, so they
do the *same steps*: the script checks that their per-step losses agree before it reports a ratio.
The Lightning side is what ``train.py`` runs (``FlattenModule`` + ``FlattenDataModule`` +
``LoRACallback`` + a CSV logger); checkpointing, validation and the progress bar are off in both.

Throughput = tokens / wall time from the start of step ``warmup`` to the end of the last step, data
loading, logging and optimizer included. Rounds alternate which loop goes first (A B, B A, ...) because
this machine is noisy and the second run of a round tends to be faster; reported: the median over
rounds of Lightning tokens/s over plain tokens/s, and the pooled ratio (all timed tokens over all
timed seconds, per loop), which an even number of rounds makes order-balanced.

    .venv/bin/python benchmarks/recovery_throughput.py [--model runs/demo/model] [--rounds 3] [--steps 10]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, DistributedSampler

from callbacks import LoRACallback
from flatten_lightning.atomic import write_text_atomic
from flatten_lightning.lightning import FlattenDataModule, FlattenModule
from flatten_lightning.lightning.datamodule import Windows
from flatten_lightning.lightning.module import step_seed
from flatten_lightning.lora import LoraSpec, add_lora
from flatten_lightning.sources import DTYPES, load_model

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data")
WIKITEXT = os.path.join(DATA, "wikitext-2", "valid.txt")
ALPACA = os.path.join(DATA, "alpaca", "alpaca_tiny.json")


@dataclass
class Setup:
    """What both loops share: model, data, optimizer, adapters, steps."""

    source: str
    dtype: str = "float32"
    train_files: list[str] = field(default_factory=lambda: [ALPACA, WIKITEXT])
    calib_file: str = WIKITEXT  # WikiText contributes only its calibration tokens to training
    calib_samples: int = 16
    calib_seqlen: int = 512
    seqlen: int = 256
    batch_size: int = 4
    steps: int = 10
    warmup: int = 2  # steps excluded from the timing (first-call allocations)
    lr: float = 1e-4
    lora: LoraSpec = field(default_factory=LoraSpec)
    seed: int = 0
    accelerator: str = "cpu"

    def datamodule(self, tokenizer) -> FlattenDataModule:
        """The windows both loops train on, cut now so that too little data fails before any training."""
        dm = FlattenDataModule(
            self.calib_file,
            self.calib_samples,
            self.calib_seqlen,
            train_files=self.train_files,
            train_seqlen=self.seqlen,
            val_windows=1,
            val_seqlen=self.seqlen,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        dm.prepare(tokenizer)
        batches = len(dm.train) // self.batch_size  # full batches of epoch 0 (drop_last)
        if batches < self.steps:
            raise ValueError(
                f"only {batches} batches of {self.batch_size} x {self.seqlen} tokens in the training data; "
                f"{self.steps} steps asked. Fix: lower --steps or --batch-size."
            )
        return dm

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.accelerator == "gpu" else "cpu")


@dataclass
class Run:
    losses: list[float]
    tokens: int  # tokens in the timed steps
    seconds: float  # wall time of the timed steps

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(setup: Setup) -> Run:
    """What a user writes without Lightning: peft adapters, AdamW, a DataLoader, forward/backward/step."""
    model, tokenizer = load_model(setup.source, DTYPES[setup.dtype])
    dm = setup.datamodule(tokenizer)
    model = add_lora(model, setup.lora).to(setup.device)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=setup.lr, weight_decay=0.0)
    # Same order as the Lightning run: a seeded permutation of the windows for epoch 0, full batches only.
    sampler = DistributedSampler(Windows(dm.train), num_replicas=1, rank=0, shuffle=True, seed=setup.seed, drop_last=True)
    loader = DataLoader(Windows(dm.train), batch_size=setup.batch_size, sampler=sampler)
    losses: list[float] = []
    t0 = 0.0
    devices = [setup.device.index or 0] if setup.device.type == "cuda" else []
    for step, batch in enumerate(loader):
        if step == setup.steps:
            break
        if step == setup.warmup:
            _sync(setup.device)
            t0 = time.perf_counter()
        batch = batch.to(setup.device)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(step_seed(setup.seed, step, 0))  # the dropout masks the Lightning run draws
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    _sync(setup.device)
    return Run(losses, (setup.steps - setup.warmup) * setup.batch_size * setup.seqlen, time.perf_counter() - t0)


class _StepClock(Callback):
    """Wall clock from the start of step ``warmup`` to the end of the last step, and each step's loss."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.t0 = self.t1 = 0.0
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            _sync(self.device)
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())

    def on_train_end(self, trainer, pl_module) -> None:
        _sync(self.device)
        self.t1 = time.perf_counter()


def lightning_loop(setup: Setup, log_dir: str) -> Run:
    """The same steps through train.py's objects: FlattenModule, FlattenDataModule, LoRACallback."""
    clock = _StepClock(setup.warmup, setup.device)
    lora = setup.lora
    trainer = Trainer(
        accelerator=setup.accelerator,
        devices=1,
        max_steps=setup.steps,
        precision="32-true",
        callbacks=[LoRACallback(lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.seed), clock],
        logger=CSVLogger(log_dir, name="lightning"),
        log_every_n_steps=5,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = FlattenModule(setup.source, setup.dtype, lr=setup.lr, seed=setup.seed)
    trainer.fit(module, datamodule=setup.datamodule(module.tokenizer))
    return Run(clock.losses, (setup.steps - setup.warmup) * setup.batch_size * setup.seqlen, clock.t1 - clock.t0)


def compare(setup: Setup, rounds: int, log_dir: str) -> dict:
    """Alternate the loops for ``rounds`` rounds; check they took the same steps; ratios per round."""
    per_round = []
    for r in range(rounds):
        order = ("plain", "lightning") if r % 2 == 0 else ("lightning", "plain")
        runs = {}
        for name in order:
            gc.collect()  # the previous run's model is garbage by now: free it before timing the next
            runs[name] = plain_loop(setup) if name == "plain" else lightning_loop(setup, log_dir)
        diff = max(abs(a - b) for a, b in zip(runs["plain"].losses, runs["lightning"].losses, strict=True))
        if diff > 1e-3:
            raise AssertionError(
                f"round {r}: the two loops did not take the same steps (max loss difference {diff:.2e}): "
                f"plain {runs['plain'].losses} vs lightning {runs['lightning'].losses}"
            )
        per_round.append(
            {
                "order": list(order),
                "max_loss_diff": diff,
                "plain_tokens_per_s": runs["plain"].tokens_per_s,
                "lightning_tokens_per_s": runs["lightning"].tokens_per_s,
                "ratio": runs["lightning"].tokens_per_s / runs["plain"].tokens_per_s,
                "losses": runs["plain"].losses,
                "seconds": {name: run.seconds for name, run in runs.items()},
                "tokens": runs["plain"].tokens,
            }
        )
    seconds = {name: sum(r["seconds"][name] for r in per_round) for name in ("plain", "lightning")}
    return {
        "rounds": per_round,
        "median_ratio": statistics.median(r["ratio"] for r in per_round),
        "pooled_ratio": seconds["plain"] / seconds["lightning"],
    }  # same tokens on both sides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="model to recover: hub id, HF directory (e.g. runs/demo/model), .gguf, smollm2")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--rounds", type=int, default=4, help="an even number balances the order")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--out", default="runs/recovery_throughput")
    args = ap.parse_args()
    if not 0 <= args.warmup < args.steps:
        ap.error(f"--warmup must be in [0, --steps), got {args.warmup} with --steps {args.steps}")
    setup = Setup(
        args.model,
        args.dtype,
        steps=args.steps,
        warmup=args.warmup,
        batch_size=args.batch_size,
        seqlen=args.seqlen,
        accelerator=args.accelerator,
    )
    with tempfile.TemporaryDirectory() as logs:
        result = compare(setup, args.rounds, logs)
    print(
        f"\nLoRA r={setup.lora.r} recovery of {args.model} ({args.dtype}, {args.accelerator}, torch threads "
        f"{torch.get_num_threads()}): {args.steps} steps of {args.batch_size} x {args.seqlen} tokens, timed from step {args.warmup}\n"
    )
    print("| round | order | plain tokens/s | Lightning tokens/s | Lightning / plain | max loss diff |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(result["rounds"]):
        print(
            f"| {i} | {' then '.join(r['order'])} | {r['plain_tokens_per_s']:.1f} | {r['lightning_tokens_per_s']:.1f} | "
            f"{r['ratio']:.3f} | {r['max_loss_diff']:.1e} |"
        )
    print(
        f"\nLightning / plain tokens/s: median over rounds {result['median_ratio']:.3f}, pooled "
        f"{result['pooled_ratio']:.3f} (target >= 0.90)"
    )
    write_text_atomic(
        os.path.join(args.out, "results.json"), json.dumps({"args": vars(args), "threads": torch.get_num_threads(), **result}, indent=2)
    )


if __name__ == "__main__":
    main()
