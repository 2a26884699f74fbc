"""Resume after SIGKILL or SIGTERM: the same merged weights as an uninterrupted run (same seed, CPU).

The interrupted run is a real ``python train.py`` subprocess that kills itself at a chosen step
(SIGKILL after a checkpoint was written, so nothing gets to clean up; or SIGTERM, the preemption
signal, which must save a checkpoint and exit non-zero); the resumed and the uninterrupted runs go
through the same CLI in-process. Every resume is checked to start at the checkpoint's step, not at 0
(a restart from scratch would end with the same weights). A resume with other structural settings
than the checkpoint's is refused, naming both values.
"""

import pytest
import torch
from lightning_helpers import RecordSteps, exported_state, report, run_train, tiny_config, tiny_model_dir, write_config

import train
from flatten_lightning.lightning.fit import CheckpointError
from flatten_lightning.report import plans_of
from flatten_lightning.schedule import lr_factor

KW = dict(max_steps=10, every_n_steps=2)
RECORD = {"class_path": "lightning_helpers.RecordSteps"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def one_shot_full(model_dir, tmp_path_factory):
    """The uninterrupted one-shot run (shared by the SIGKILL and SIGTERM tests)."""
    full = tmp_path_factory.mktemp("full")
    train.main(["fit", "--config", str(write_config(tiny_config(model_dir, full, None, **KW), full / "full.yaml"))])
    return full / "model"


def _decisions(r: dict) -> list:
    """The plans without their timings."""
    return [[{k: v for k, v in s.items() if k != "seconds"} for s in p["steps"]] for p in plans_of(r)]


def _resume_and_compare(model_dir, tmp_path, schedule, broken, ckpt, full_model, model_extra=None):
    """Resume ``broken`` from ``ckpt``; it must start at the checkpoint's step and end equal to ``full_model``."""
    saved_step = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    assert 0 < saved_step < KW["max_steps"]
    resume = tiny_config(model_dir, broken, schedule, extra_callbacks=[RECORD], model_extra=model_extra, **KW)
    cfg = write_config(resume, tmp_path / "resume.yaml")
    cli = train.main(["fit", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    steps = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RecordSteps))
    assert (steps.start, steps.steps) == (saved_step, KW["max_steps"] - saved_step)  # resumed, not restarted
    a, b = exported_state(full_model), exported_state(broken / "model")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    ra, rb = report(full_model), report(broken / "model")
    assert _decisions(ra) == _decisions(rb)
    assert ra["perplexity"]["before_compression"] == rb["perplexity"]["before_compression"]  # kept in callback state
    return ra, steps


def _kill_resume_compare(model_dir, tmp_path, schedule, kill_at: int, full_model, model_extra=None):
    broken = tmp_path / "broken"
    kill = {"class_path": "lightning_helpers.SignalAtStep", "init_args": {"step": kill_at}}
    killed = tiny_config(model_dir, broken, schedule, extra_callbacks=[kill], model_extra=model_extra, **KW)
    killed_cfg = write_config(killed, tmp_path / "killed.yaml")
    proc = run_train(["fit", "--config", str(killed_cfg)])
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (broken / "model").exists()
    ckpt = broken / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    return _resume_and_compare(model_dir, tmp_path, schedule, broken, ckpt, full_model, model_extra)


def test_kill_during_lora_recovery(model_dir, tmp_path, one_shot_full):
    # One-shot at step 0, adapters right after; checkpoints at steps 2 and 4, killed before step 6.
    r, _ = _kill_resume_compare(model_dir, tmp_path, None, kill_at=5, full_model=one_shot_full)
    assert r["lora"] is not None and r["layers"] == 4


def test_kill_during_recovery_with_a_cosine_schedule(model_dir, tmp_path):
    """The schedule follows the global step: each step of the uninterrupted run runs at lr f(s), and the resumed
    run continues the curve (not restarting it) to the same weights."""
    extra, full = {"lr_schedule": "cosine", "warmup_steps": 2}, tmp_path / "full"
    cfg = tiny_config(model_dir, full, None, extra_callbacks=[RECORD], model_extra=extra, **KW)
    cli = train.main(["fit", "--config", str(write_config(cfg, tmp_path / "full.yaml"))])
    lrs = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RecordSteps)).lrs
    total, lr = KW["max_steps"], cfg["model"]["lr"]
    assert lrs == {s: pytest.approx(lr * lr_factor(s, total, 2, "cosine")) for s in range(total)}
    _, resumed = _kill_resume_compare(model_dir, tmp_path, None, kill_at=5, full_model=full / "model", model_extra=extra)
    assert resumed.lrs == {s: lrs[s] for s in range(resumed.start, total)}


def test_kill_between_two_compression_stages(model_dir, tmp_path):
    # Stage 2 at step 6; the last checkpoint (step 4) holds stage 1 only; stage 2 and LoRA happen after the resume.
    schedule = [{"step": 0, "target_layers": 5}, {"step": 6, "target_layers": 4}]
    full = tmp_path / "full"
    train.main(["fit", "--config", str(write_config(tiny_config(model_dir, full, schedule, **KW), tmp_path / "full.yaml"))])
    r, _ = _kill_resume_compare(model_dir, tmp_path, schedule, kill_at=5, full_model=full / "model")
    assert [s["step"] for s in r["stages"]] == [0, 6]


def test_sigterm_saves_a_checkpoint_exits_non_zero_and_resumes(model_dir, tmp_path, one_shot_full):
    broken = tmp_path / "broken"
    term = {"class_path": "lightning_helpers.SignalAtStep", "init_args": {"step": 4, "signal_name": "SIGTERM"}}
    cfg = write_config(tiny_config(model_dir, broken, None, extra_callbacks=[term], **KW), tmp_path / "term.yaml")
    proc = run_train(["fit", "--config", str(cfg)])
    ckpt = broken / "checkpoints" / "preempted.ckpt"
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert f"--ckpt_path {ckpt}" in proc.stderr
    assert not (broken / "model").exists() and ckpt.is_file()
    _resume_and_compare(model_dir, tmp_path, None, broken, ckpt, one_shot_full)


@pytest.fixture(scope="module")
def two_step_checkpoint(model_dir, tmp_path_factory):
    """A checkpoint after compression to 4 layers and LoRA r=4, step 2 of 4."""
    run = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config(model_dir, run, max_steps=4, every_n_steps=2)
    cfg["trainer"]["callbacks"][0]["init_args"]["eval_perplexity"] = False
    train.main(["fit", "--config", str(write_config(cfg, run / "cfg.yaml"))])
    (ckpt,) = run.glob("checkpoints/*step=2.ckpt")
    return ckpt


def _resume_with(model_dir, tmp_path, ckpt, change) -> None:
    cfg = tiny_config(model_dir, tmp_path / "run", max_steps=4)
    change(cfg)
    train.main(["fit", "--config", str(write_config(cfg, tmp_path / "cfg.yaml")), "--ckpt_path", str(ckpt)])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["trainer"]["callbacks"][1]["init_args"].update(r=8), "LoRACallback r=4, this config has r=8"),
        (lambda c: c["trainer"]["callbacks"][1]["init_args"].update(alpha=4), "LoRACallback alpha=8, this config has alpha=4"),
        (lambda c: c["trainer"]["callbacks"][1]["init_args"].update(target_modules=["q_proj"]), "target_modules=.*this config has"),
        (
            lambda c: c["trainer"]["callbacks"][0]["init_args"].update(method="flatten-paper"),
            "method=flatten, this config has method=flatten-paper",
        ),
        (lambda c: c["trainer"]["callbacks"][0]["init_args"].update(target_layers=3), "target_layers': 4.*this config has schedule=.*3"),
    ],
    ids=["rank", "alpha", "targets", "method", "schedule"],
)
def test_resume_with_other_structural_settings_is_refused(model_dir, tmp_path, two_step_checkpoint, change, message):
    with pytest.raises(ValueError, match=message):
        _resume_with(model_dir, tmp_path, two_step_checkpoint, change)
    assert not (tmp_path / "run" / "model").exists()


def test_resume_from_another_model_source_is_refused(model_dir, tmp_path, two_step_checkpoint):
    other = tiny_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(CheckpointError, match=f"made from model.source '{model_dir}' but the config says '{other}'"):
        _resume_with(model_dir, tmp_path, two_step_checkpoint, lambda c: c["model"].update(source=str(other)))


def test_resume_accepts_another_spelling_of_the_same_source(model_dir, tmp_path, two_step_checkpoint):
    _resume_with(model_dir, tmp_path, two_step_checkpoint, lambda c: c["model"].update(source=f"{model_dir}/../{model_dir.name}"))
    assert report(tmp_path / "run" / "model")["training"]["global_step"] == 4


def test_truncated_checkpoint_is_named_before_the_model_loads(model_dir, tmp_path, two_step_checkpoint):
    cut = tmp_path / "cut.ckpt"
    data = two_step_checkpoint.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # what a kill during a copy or a full disk leaves
    with pytest.raises(CheckpointError, match=f"--ckpt_path {cut} cannot be read .*truncated or not a checkpoint"):
        _resume_with(model_dir, tmp_path, cut, lambda c: None)
