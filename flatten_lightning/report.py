"""``compression_report.json``: one schema for the compression command and the Lightning export.

{
  "schema": 1,
  "method": "flatten",                      # a name from methods.METHODS
  "source": "smollm2",                      # what the model was loaded from
  "original_layers": 30, "layers": 24,
  "stages": [                               # one per compression stage (the CLI runs one, at step null)
    {"step": 0, "target_layers": 24, "layers_before": 30, "seconds": 168.0,
     "params": 113265984, "ppl": 33.9,      # ppl: held-out perplexity after the stage, when measured
     "record": {...}}                       # a Plan dict for the flatten methods, the peer's record otherwise
  ],
  "calibration": {"file": ..., "samples": 16, "seqlen": 512, "tokens": 8192},
  "params": {"dense": ..., "compressed": ..., "active": ...},
  "perplexity": {"before_compression": ..., "after_compression": ..., "after_recovery": ...},
  "timings_s": {...},
  ...                                       # extra sections: lora, training, data, peak_rss_mb, settings
}
"""

from __future__ import annotations

from typing import Any

from flatten_lightning.data import calibration_shares

SCHEMA_VERSION = 1


def calibration_record(files: list[str], samples: int, seqlen: int) -> dict[str, Any]:
    """Which calibration windows were used: ``samples`` x ``seqlen`` tokens, in turn from the start of each of ``files``."""
    shares = calibration_shares(samples, len(files))
    return {"files": files, "windows_per_file": shares, "samples": samples, "seqlen": seqlen, "tokens": samples * seqlen}


def stage_record(
    target_layers: int,
    layers_before: int,
    seconds: float,
    params: int,
    record: dict[str, Any],
    step: int | None = None,
    ppl: float | None = None,
) -> dict[str, Any]:
    """One compression stage of the report."""
    return {
        "step": step,
        "target_layers": target_layers,
        "layers_before": layers_before,
        "seconds": seconds,
        "params": params,
        "ppl": ppl,
        "record": record,
    }


def build_report(
    *,
    method: str,
    source: str,
    original_layers: int,
    layers: int,
    stages: list[dict[str, Any]],
    calibration: dict[str, Any],
    params: dict[str, int],
    perplexity: dict[str, float | None],
    timings_s: dict[str, float],
    **sections: Any,
) -> dict[str, Any]:
    """The report dict; ``sections`` adds named extra sections (lora, training, data, ...)."""
    report = {
        "schema": SCHEMA_VERSION,
        "method": method,
        "source": source,
        "original_layers": original_layers,
        "layers": layers,
        "stages": stages,
        "calibration": calibration,
        "params": params,
        "perplexity": perplexity,
        "timings_s": timings_s,
    }
    clash = sorted(set(sections) & set(report))
    if clash:
        raise ValueError(f"report sections {clash} would overwrite the schema's own keys")
    return {**report, **sections}


def plans_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan dicts of a flatten-method report, in stage order (e.g. to replay with rebuild_structure)."""
    return [s["record"] for s in report["stages"] if "steps" in s["record"]]
