"""What a structure change during ``fit`` means for the strategy: new DDP wrapper, new optimizer.

Compression replaces parameters (the merged block is a new module) and LoRA freezes the base and adds
adapters, so the optimizer created at ``strategy.setup`` holds stale tensors and the DDP reducer has
buckets for parameters that no longer exist. Both are rebuilt here, the way Lightning 2.6's
``Strategy.setup`` / ``DDPStrategy.setup`` build them in the first place.

Sharded strategies (FSDP, DeepSpeed, model-parallel) shard the parameters at wrap time and cannot be
rewrapped mid-fit: compress before wrapping (a first fit on one device or under DDP, then export),
or between fits, and run recovery under FSDP from the exported directory.
"""

from __future__ import annotations

import gc

import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from flatten_lightning.calibrate import Reduce, no_reduce


def check_strategy(trainer: Trainer) -> None:
    """Refuse strategies whose parameters cannot change shape during fit."""
    s = trainer.strategy
    if isinstance(s, DDPStrategy) and getattr(s, "_start_method", "popen") != "popen":
        raise ValueError(
            f"strategy {type(s).__name__} with start method '{s._start_method}' (ddp_spawn / ddp_fork / ddp_notebook) "
            "copies rank 0's weights back into the main process's dense model at the end, which cannot hold the "
            "compressed shapes. Fix: use strategy: ddp (one process per device, launched by train.py)."
        )
    if not isinstance(s, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"compression during fit needs every rank to hold the whole model (single device or DDP), not "
            f"{type(s).__name__}. Fix: compress before wrapping (or between fits): run the compression with "
            "strategy ddp or one device, export, then recover from the exported directory under FSDP."
        )


def refresh_after_structure_change(trainer: Trainer) -> None:
    """Rewrap DDP around the changed module and rebuild the optimizer(s) over its current parameters.

    A no-op before ``strategy.setup`` has run (the optimizer is then created from the new model anyway).
    """
    s = trainer.strategy
    if not s.optimizers:  # compression during setup: nothing built yet
        return
    if isinstance(s, DDPStrategy) and s.model is not s.lightning_module:
        s.model = s.lightning_module  # drop the old wrapper; its reducer hooks go with it
        gc.collect()
        s.configure_ddp()  # DistributedDataParallel(...) also broadcasts rank 0's weights
    s.setup_optimizers(trainer)
    s.setup_precision_plugin()
    _optimizers_to_device(s.optimizers, s.root_device)


def all_reduce_sum(trainer: Trainer) -> Reduce:
    """The ``reduce`` for flatten_gpt: all-reduce(SUM) across ranks under DDP, identity otherwise."""
    if trainer.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return no_reduce

    def reduce(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out

    return reduce


def gather_objects(trainer: Trainer, obj: object) -> list[object]:
    """``obj`` from every rank (one element per rank); ``[obj]`` in a single process."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    out: list[object] = [None] * trainer.world_size
    torch.distributed.all_gather_object(out, obj)
    return out
