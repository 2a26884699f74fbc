"""FlattenCallback through the real CLI in-process: one-shot and staged schedules, report, metrics, errors."""

import csv
import time

import pytest
import torch
from lightning_helpers import report, tiny_config, tiny_model_dir, write_config
from transformers import AutoModelForCausalLM

import train
from callbacks import FlattenCallback, ScheduleError
from callbacks.compression import Stage, validate_schedule
from flatten_lightning.compress import Plan, rebuild_structure
from flatten_lightning.report import plans_of


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


def fit(cfg: dict, tmp_path, *extra: str):
    return train.main(["fit", "--config", str(write_config(cfg, tmp_path / "cfg.yaml")), *extra])


def test_one_shot_compression_recovery_export(model_dir, tmp_path):
    run = tmp_path / "run"
    cli = fit(tiny_config(model_dir, run, target_layers=4, max_steps=8), tmp_path)
    out = run / "model"
    r = report(out)
    assert r["original_layers"] == 6 and r["layers"] == 4 and len(plans_of(r)) == 1
    assert [s["step"] for s in r["stages"]] == [0] and r["stages"][0]["layers_before"] == 6
    p = r["perplexity"]
    assert all(p[k] > 1 for k in ("before_compression", "after_compression", "after_recovery"))
    assert p["after_recovery"] < p["after_compression"]  # 8 steps on a random model already recover
    assert r["params"]["compressed"] < r["params"]["dense"]
    assert r["lora"]["r"] == 4 and r["timings_s"]["compression"] > 0
    # The export is an ordinary model: plain transformers loads it and reproduces the module's logits.
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    module = cli.model.eval()
    assert plain.config.num_hidden_layers == 4
    assert torch.allclose(plain(input_ids=ids).logits, module(ids), atol=1e-5)
    assert not any("lora" in k for k in plain.state_dict())
    # Compression metrics reach the Lightning logger.
    rows = list(csv.DictReader(open(next((run / "logs").glob("version_*/metrics.csv")))))
    comp = [row for row in rows if row.get("compress/layers")]
    assert comp and float(comp[0]["compress/layers"]) == 4 and float(comp[0]["compress/ppl"]) == pytest.approx(p["after_compression"])
    assert any(row.get("val_ppl") for row in rows) and any(row.get("train_loss") for row in rows)


def test_staged_schedule_replays_on_the_dense_model(model_dir, tmp_path):
    run = tmp_path / "run"
    schedule = [{"step": 0, "target_layers": 5}, {"step": 3, "target_layers": 4}]
    cli = fit(tiny_config(model_dir, run, schedule, max_steps=6), tmp_path)
    r = report(run / "model")
    assert [s["step"] for s in r["stages"]] == [0, 3] and [s["layers_before"] for s in r["stages"]] == [6, 5]
    assert r["layers"] == 4 and [len(p["groups"]) for p in plans_of(r)] == [5, 4]
    # The plans are data: replaying both on the dense model gives the exported shapes.
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    for d in plans_of(r):
        rebuild_structure(dense, Plan.from_dict(d))
    exported = AutoModelForCausalLM.from_pretrained(run / "model")
    assert {k: v.shape for k, v in dense.state_dict().items()} == {k: v.shape for k, v in exported.state_dict().items()}
    assert cli.trainer.global_step == 6


@pytest.mark.parametrize(
    "schedule, message",
    [
        ([Stage(0, 4), Stage(0, 3)], "steps must be strictly increasing: stage 2 at step 0"),
        ([Stage(0, 4), Stage(5, 4)], "depths must decrease: stage 2 targets 4 layers"),
        ([Stage(-1, 4)], "has step -1"),
        ([Stage(0, 0)], "asks for 0 layers"),
        ([], "schedule is empty"),
    ],
)
def test_schedule_shape_errors(schedule, message):
    with pytest.raises(ScheduleError, match=message):
        validate_schedule(schedule)


def test_schedule_needs_exactly_one_form():
    with pytest.raises(ScheduleError, match="exactly one of target_layers"):
        FlattenCallback()
    with pytest.raises(ScheduleError, match="exactly one of target_layers"):
        FlattenCallback(target_layers=3, schedule=[{"step": 0, "target_layers": 3}])


def test_not_increasing_schedule_fails_in_the_cli(model_dir, tmp_path):
    cfg = tiny_config(model_dir, tmp_path / "run", [{"step": 4, "target_layers": 5}, {"step": 2, "target_layers": 4}])
    # jsonargparse wraps errors raised while it instantiates the callbacks; the message is kept.
    with pytest.raises(ValueError, match="schedule steps must be strictly increasing: stage 2 at step 2"):
        fit(cfg, tmp_path)


@pytest.mark.parametrize("target", [6, 9])
def test_impossible_depth_fails_at_setup_before_any_work(model_dir, tmp_path, target):
    run = tmp_path / "run"
    t0 = time.perf_counter()
    with pytest.raises(ScheduleError, match=f"target depth {target} is impossible for a model of 6 layers"):
        fit(tiny_config(model_dir, run, target_layers=target), tmp_path)
    assert time.perf_counter() - t0 < 30
    assert not (run / "model").exists() and not (run / "checkpoints").exists()


def test_stage_after_the_end_of_training_is_refused(model_dir, tmp_path):
    cfg = tiny_config(model_dir, tmp_path / "run", [{"step": 0, "target_layers": 5}, {"step": 8, "target_layers": 4}], max_steps=8)
    with pytest.raises(ScheduleError, match="stage at step 8 would never run: training stops at max_steps=8"):
        fit(cfg, tmp_path)


def test_strategies_that_cannot_follow_shape_changes_are_refused():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from callbacks.strategy import check_strategy

    with pytest.raises(ValueError, match="compress before wrapping"):
        check_strategy(SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy)))
    with pytest.raises(ValueError, match="start method 'spawn'.*Fix: use strategy: ddp"):
        check_strategy(SimpleNamespace(strategy=DDPStrategy(start_method="spawn")))
    check_strategy(SimpleNamespace(strategy=DDPStrategy()))


def test_recovery_by_logit_and_hidden_distillation_from_the_dense_model(model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(model_dir, run, max_steps=4)
    cfg["model"].update(distill_alpha=0.5, distill_temperature=2.0, distill_hidden=0.5)
    cli = fit(cfg, tmp_path)
    assert cli.model.__dict__["_teacher"].config.num_hidden_layers == 6  # the teacher stayed dense
    rows = list(csv.DictReader(open(next((run / "logs").glob("version_*/metrics.csv")))))
    kd = [float(r["train_kd"]) for r in rows if r.get("train_kd")]
    hd = [float(r["train_hidden"]) for r in rows if r.get("train_hidden")]
    # Both signals on every step after the step-0 compression, with LoRA adapters in place (hooks through peft).
    assert len(kd) == 4 and all(k > 0 for k in kd) and len(hd) == 4 and all(0 < h < 1 for h in hd)
    assert cli.model.teacher_indices() == [g[-1] for g in cli.model.plans[0].groups]
    training = report(run / "model")["training"]
    assert (training["distill_alpha"], training["distill_hidden"]) == (0.5, 0.5)
