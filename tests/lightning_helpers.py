"""Helpers for the Lightning tests: a tiny model directory, a tiny run config, a self-signalling callback and a step recorder.

Runs go through ``train.py`` (the real CLI) in subprocesses where a test needs a process to die or
several processes (DDP); otherwise through ``train.main(args)`` in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import ROOT, WIKITEXT, make_tiny, word_tokenizer
from lightning.pytorch import Callback

ALPACA = os.path.join(ROOT, "..", "shared", "data", "alpaca", "alpaca_tiny.json")


def tiny_model_dir(path: Path, layers: int = 6, seed: int = 0) -> Path:
    """A tiny random Llama (float32) with a WikiText word tokenizer, saved as a HF directory."""
    model = make_tiny("llama", seed=seed, dtype=torch.float32, num_hidden_layers=layers)
    words = open(WIKITEXT, encoding="utf-8").read(20000).split()[:500]
    model.save_pretrained(path)
    word_tokenizer(words).save_pretrained(path)
    return path


def tiny_config(
    model_dir: Path,
    run_dir: Path,
    schedule: list[dict] | None = None,
    *,
    target_layers: int | None = 4,
    max_steps: int = 8,
    lora: bool = True,
    lr: float = 1e-2,
    every_n_steps: int | None = None,
    extra_callbacks: list[dict] | None = None,
    devices: int = 1,
    strategy: str = "auto",
    calib_samples: int = 8,
    dtype: str = "float32",
    model_extra: dict | None = None,
) -> dict:
    """A complete train.py config for the tiny model (CPU, seconds)."""
    callbacks: list[dict] = [
        {
            "class_path": "callbacks.FlattenCallback",
            "init_args": ({"schedule": schedule} if schedule else {"target_layers": target_layers}) | {"progress": False, "batch_size": 4},
        }
    ]
    if lora:
        callbacks.append({"class_path": "callbacks.LoRACallback", "init_args": {"r": 4, "alpha": 8, "dropout": 0.1}})
    callbacks.append({"class_path": "callbacks.ExportCallback", "init_args": {"out_dir": str(run_dir / "model")}})
    if every_n_steps:
        callbacks.append(
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": str(run_dir / "checkpoints"),
                    "every_n_train_steps": every_n_steps,
                    "save_last": True,
                    "save_top_k": -1,
                },
            }
        )
    callbacks += extra_callbacks or []
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "strategy": strategy,
            "max_steps": max_steps,
            "num_sanity_val_steps": 0,
            "val_check_interval": 4,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run_dir),
            "callbacks": callbacks,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "logs"}},
        },
        "model": {"source": str(model_dir), "dtype": dtype, "lr": lr, "seed": 0, **(model_extra or {})},
        "data": {
            "calib_file": WIKITEXT,
            "calib_samples": calib_samples,
            "calib_seqlen": 32,
            "train_files": [ALPACA, WIKITEXT],
            "train_seqlen": 32,
            "train_max_windows": 24,
            "val_windows": 2,
            "val_seqlen": 64,
            "batch_size": 2,
            "eval_batch_size": 2,
        },
    }


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_train(args: list[str], cwd: str = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python train.py <args>`` in a subprocess (one thread: 2-core machine shared with other jobs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def exported_state(out_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out_dir / "model.safetensors"))


def report(out_dir: Path) -> dict:
    return json.loads((out_dir / "compression_report.json").read_text())


class SignalAtStep(Callback):
    """Send this process ``signal_name`` at the start of the batch that would take global step ``step`` + 1.

    SIGKILL: nothing gets to clean up (a crash); SIGTERM: the preemption signal a scheduler sends.
    """

    def __init__(self, step: int, signal_name: str = "SIGKILL") -> None:
        self.step, self.signum = step, getattr(signal, signal_name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class RecordSteps(Callback):
    """The global step at which training started, the optimizer steps this fit took (to prove a resume resumed)
    and the learning rate each step ran with, by global step."""

    def __init__(self) -> None:
        self.start: int | None = None
        self.steps = 0
        self.lrs: dict[int, float] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1
