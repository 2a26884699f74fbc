"""The recovery-throughput benchmark compares like with like: both loops take the same steps.

Its ratio only means something if the plain PyTorch + peft loop and the Lightning pipeline train the
same adapters on the same batches with the same dropout masks; here that is checked on a tiny model
(per-step losses equal), and the benchmark's own guard is shown to refuse loops that diverge.
"""

import pytest
from lightning_helpers import tiny_model_dir

from benchmarks import recovery_throughput as rt
from flatten_lightning.lora import LoraSpec


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> rt.Setup:
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")
    return rt.Setup(
        str(model_dir),
        seqlen=32,
        batch_size=2,
        steps=5,
        warmup=1,
        calib_samples=4,
        calib_seqlen=32,
        lr=1e-2,
        lora=LoraSpec(r=4, alpha=8, dropout=0.1),
    )


def test_plain_and_lightning_loops_take_the_same_steps(setup, tmp_path):
    plain = rt.plain_loop(setup)
    lightning = rt.lightning_loop(setup, str(tmp_path))
    assert len(plain.losses) == len(lightning.losses) == setup.steps
    # Same adapters, batches, dropout masks and AdamW updates: the losses agree at every step ...
    assert max(abs(a - b) for a, b in zip(plain.losses, lightning.losses)) <= 1e-6
    # ... and the steps did train (with lr 1e-2 the loss moves well beyond rounding).
    assert max(plain.losses) - min(plain.losses) > 1e-2
    assert plain.tokens == lightning.tokens == (setup.steps - setup.warmup) * setup.batch_size * setup.seqlen
    assert plain.seconds > 0 and lightning.seconds > 0


def test_compare_refuses_loops_that_diverge(setup, tmp_path, monkeypatch):
    real = rt.plain_loop

    def shifted(s: rt.Setup) -> rt.Run:
        run = real(s)
        return rt.Run([x + 0.01 for x in run.losses], run.tokens, run.seconds)

    monkeypatch.setattr(rt, "plain_loop", shifted)
    with pytest.raises(AssertionError, match="did not take the same steps"):
        rt.compare(setup, rounds=1, log_dir=str(tmp_path))


@pytest.mark.parametrize("loop", ["plain", "lightning"])
def test_too_little_data_fails_before_training(setup, tmp_path, loop):
    short = rt.Setup(setup.source, seqlen=32, batch_size=2, steps=10_000, warmup=1, calib_samples=4, calib_seqlen=32, lora=setup.lora)
    with pytest.raises(ValueError, match="steps asked"):
        rt.plain_loop(short) if loop == "plain" else rt.lightning_loop(short, str(tmp_path))
    assert not (tmp_path / "lightning").exists()  # the Lightning run never started (its logger writes there)
