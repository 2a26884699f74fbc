"""Resume after SIGKILL: the same merged weights as an uninterrupted run (same seed, CPU).

The killed run is a real ``python train.py`` subprocess that SIGKILLs itself at a chosen step (after
a checkpoint was written), so nothing gets to clean up; the resumed and the uninterrupted runs go
through the same CLI in-process.
"""

import pytest
from lightning_helpers import exported_state, report, run_train, tiny_config, tiny_model_dir, write_config

import train
from flatten_lightning.report import plans_of


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


def _decisions(r: dict) -> list:
    """The plans without their timings."""
    return [[{k: v for k, v in s.items() if k != "seconds"} for s in p["steps"]] for p in plans_of(r)]


def _kill_resume_compare(model_dir, tmp_path, schedule, kill_at: int, max_steps: int = 10):
    full, broken = tmp_path / "full", tmp_path / "broken"
    kw = dict(max_steps=max_steps, every_n_steps=2)
    train.main(["fit", "--config", str(write_config(tiny_config(model_dir, full, schedule, **kw), tmp_path / "full.yaml"))])
    kill = {"class_path": "lightning_helpers.KillAtStep", "init_args": {"step": kill_at}}
    killed_cfg = write_config(tiny_config(model_dir, broken, schedule, extra_callbacks=[kill], **kw), tmp_path / "killed.yaml")
    proc = run_train(["fit", "--config", str(killed_cfg)])
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (broken / "model").exists()
    ckpt = broken / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    cfg = write_config(tiny_config(model_dir, broken, schedule, **kw), tmp_path / "resume.yaml")
    train.main(["fit", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    a, b = exported_state(full / "model"), exported_state(broken / "model")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    ra, rb = report(full / "model"), report(broken / "model")
    assert _decisions(ra) == _decisions(rb)
    assert ra["perplexity"]["before_compression"] == rb["perplexity"]["before_compression"]  # kept in callback state
    return ra


def test_kill_during_lora_recovery(model_dir, tmp_path):
    # One-shot at step 0, adapters right after; checkpoints at steps 2 and 4, killed before step 6.
    r = _kill_resume_compare(model_dir, tmp_path, None, kill_at=5)
    assert r["lora"] is not None and r["layers"] == 4


def test_kill_between_two_compression_stages(model_dir, tmp_path):
    # Stage 2 at step 6; the last checkpoint (step 4) holds stage 1 only; stage 2 and LoRA happen after the resume.
    schedule = [{"step": 0, "target_layers": 5}, {"step": 6, "target_layers": 4}]
    r = _kill_resume_compare(model_dir, tmp_path, schedule, kill_at=5)
    assert [s["step"] for s in r["stages"]] == [0, 6]
