"""FlattenModule: losses, validation perplexity, optimizer contents, and the checkpoint structure record."""

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning_helpers import tiny_model_dir

from flatten_lightning.compress import CompressConfig, flatten_gpt
from flatten_lightning.lightning import FlattenModule, PlanMismatchError
from flatten_lightning.lightning.module import DivergenceError
from flatten_lightning.lora import LoraSpec
from flatten_lightning.perplexity import perplexity, windows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def ids():
    return torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(2))


def _compressed(model_dir, target=4) -> FlattenModule:
    m = FlattenModule(str(model_dir))
    calib = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    m.record_plan(flatten_gpt(m.model, calib, CompressConfig(target), progress=False))
    return m


def test_training_loss_is_next_token_cross_entropy(model_dir, ids):
    m = FlattenModule(str(model_dir))
    loss = m.training_step(ids, 0)
    ref = m.model(input_ids=ids, labels=ids).loss  # HF shifts the labels itself
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_distillation_teacher_is_frozen_dense_and_outside_the_state(model_dir, ids):
    m = FlattenModule(str(model_dir), distill_alpha=0.5, distill_temperature=2.0)
    teacher = m.__dict__["_teacher"]
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("_teacher") for k in m.state_dict())
    assert all(id(p) not in {id(q) for q in teacher.parameters()} for p in m.parameters())
    # Student == teacher before compression: KD is zero, so the loss is half the cross entropy.
    ce = m.model(input_ids=ids, labels=ids).loss
    assert m.training_step(ids, 0).item() == pytest.approx(0.5 * ce.item(), rel=1e-5)
    # After compression the student differs; KD is a positive KL and gradients reach only the student.
    calib = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    flatten_gpt(m.model, calib, CompressConfig(4), progress=False)
    logits = m(ids)[:, :-1]
    kd = m._distillation(ids, logits)
    t_logits = teacher(input_ids=ids).logits[:, :-1]
    ref = (
        F.kl_div(
            F.log_softmax(logits / 2, -1).reshape(-1, 97),
            F.log_softmax(t_logits / 2, -1).reshape(-1, 97),
            log_target=True,
            reduction="batchmean",
        )
        * 4
    )
    assert kd.item() > 0 and kd.item() == pytest.approx(ref.item(), rel=1e-5)
    kd.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_validation_perplexity_matches_the_library_protocol(model_dir):
    m = FlattenModule(str(model_dir)).eval()
    text = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(3))
    for batch in windows(text, 64).split(2):
        m.validation_step(batch, 0)
    assert m.val_ppl.compute().item() == pytest.approx(perplexity(m.model, text, 64, progress=False).ppl, rel=1e-5)


def test_optimizer_holds_only_trainable_parameters(model_dir):
    m = _compressed(model_dir)
    n_all = sum(p.numel() for p in m.parameters())
    opt = m.configure_optimizers()
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_all
    assert opt.param_groups[0]["lr"] == 1e-4
    m.attach_lora(LoraSpec(r=2, alpha=4, target_modules=["q_proj", "down_proj"]))
    params = [p for g in m.configure_optimizers().param_groups for p in g["params"]]
    names = {id(p): n for n, p in m.named_parameters()}
    assert params and all("lora_" in names[id(p)] for p in params)


def _checkpoint(m: FlattenModule) -> dict:
    ckpt = {"state_dict": copy.deepcopy(m.state_dict())}
    m.on_save_checkpoint(ckpt)
    return ckpt


@pytest.mark.parametrize("lora", [False, True])
def test_checkpoint_rebuilds_structure_before_weights(model_dir, ids, lora):
    m = _compressed(model_dir)
    if lora:
        m.attach_lora(LoraSpec(r=2, alpha=4))
        with torch.no_grad():  # make the adapters non-trivial so that their weights matter
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    ckpt = _checkpoint(m)
    fresh = FlattenModule(str(model_dir))
    assert fresh.num_layers == 6
    fresh.on_load_checkpoint(ckpt)  # what Lightning calls before load_model_state_dict
    fresh.load_state_dict(ckpt["state_dict"])
    assert fresh.num_layers == 4 and len(fresh.plans) == 1 and (fresh.lora_spec is not None) == lora
    m.eval(), fresh.eval()
    assert torch.equal(m(ids), fresh(ids))


def test_checkpoint_from_another_base_model_is_refused(model_dir, tmp_path):
    ckpt = _checkpoint(_compressed(model_dir))
    other = FlattenModule(str(tiny_model_dir(tmp_path / "five", layers=5)))
    with pytest.raises(
        PlanMismatchError, match="compression stage 1 of the checkpoint does not fit this model.*6 layers but this model has 5"
    ):
        other.on_load_checkpoint(ckpt)


def test_checkpoint_with_tampered_plan_is_refused(model_dir):
    ckpt = _checkpoint(_compressed(model_dir))
    ckpt["flatten_lightning"]["plans"][0]["steps"].pop()  # one merge fewer: 5 blocks, weights for 4
    with pytest.raises(PlanMismatchError, match="plan does not match its weights.*Fix: resume with the same model source"):
        FlattenModule(str(model_dir)).on_load_checkpoint(ckpt)


def test_checkpoint_without_structure_record_is_refused(model_dir):
    with pytest.raises(PlanMismatchError, match="no flatten_lightning structure record"):
        FlattenModule(str(model_dir)).on_load_checkpoint({"state_dict": {}})


def test_bad_arguments(model_dir):
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        FlattenModule(str(model_dir), dtype="fp8")
    with pytest.raises(ValueError, match="distill_alpha must be in"):
        FlattenModule(str(model_dir), distill_alpha=2.0)


def test_non_finite_loss_stops_training(model_dir, ids):
    m = FlattenModule(str(model_dir))
    with torch.no_grad():
        m.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(DivergenceError, match="training diverged at step 0: the training loss is nan.*no checkpoint was saved"):
        m.training_step(ids, 0)
