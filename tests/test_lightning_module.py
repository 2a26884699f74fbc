"""FlattenModule: losses (CE, logit and hidden-state distillation), validation perplexity, optimizer contents, the checkpoint
structure record, and starting recovery from a compressed export."""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import WIKITEXT
from lightning_helpers import tiny_model_dir
from transformers import AutoModelForCausalLM

from flatten_lightning import cli
from flatten_lightning.compress import CompressConfig, flatten_gpt
from flatten_lightning.distill import block_outputs, compose_groups, hidden_distillation, logit_distillation
from flatten_lightning.lightning import FlattenModule, PlanMismatchError
from flatten_lightning.lightning.module import DivergenceError
from flatten_lightning.lora import LoraSpec
from flatten_lightning.perplexity import perplexity, windows
from flatten_lightning.report import plans_of


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
    t_out, _ = m.teacher_outputs(ids, logits=True, blocks=[])
    kd = logit_distillation(logits, t_out[:, :-1], 2.0)
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


def test_use_teacher_distils_from_a_frozen_copy_of_the_given_model(model_dir, ids):
    m = FlattenModule(str(model_dir), distill_alpha=1.0, distill_hidden=1.0)
    other = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a dense model of the same structure, trained elsewhere
    m.use_teacher(other)
    t_logits, t_blocks = m.teacher_outputs(ids, logits=True, blocks=[0, 1])
    with block_outputs(list(other.model.layers[:2])) as outs:
        ref = other(input_ids=ids).logits
    assert torch.allclose(t_logits, ref, atol=1e-5) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(t_blocks, outs))
    # A copy, frozen and outside the module: training the given model later does not change the teacher.
    teacher = m.__dict__["_teacher"]
    assert teacher is not other and all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    assert torch.equal(m.teacher_outputs(ids, logits=True, blocks=[])[0], t_logits)
    assert not any(k.startswith("_teacher") for k in m.state_dict())
    # Student == source, teacher != source: the KD term is no longer zero (it is the whole loss at alpha 1).
    assert m.training_step(ids, 0).item() > 1e-4


def test_use_teacher_refuses_what_it_cannot_distil_from(model_dir):
    with pytest.raises(ValueError, match="keeps no teacher"):
        FlattenModule(str(model_dir)).use_teacher(AutoModelForCausalLM.from_pretrained(model_dir))
    m = FlattenModule(str(model_dir), distill_alpha=0.5)
    shallow = _compressed(model_dir).base_model
    with pytest.raises(ValueError, match="the teacher has 4 blocks, the source"):
        m.use_teacher(shallow)


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


def _hidden_terms(m: FlattenModule, ids: torch.Tensor) -> tuple[torch.Tensor, list, list]:
    """HD of the module on ``ids`` (student in train mode, with this step's seed), the student and the teacher states."""
    with block_outputs(m.student_blocks()) as student:
        m.seeded(ids)
    _, teacher = m.teacher_outputs(ids, logits=False, blocks=m.teacher_indices())
    return hidden_distillation(student, teacher, m.hparams.distill_hidden_norm), student, teacher


def test_hidden_distillation_is_zero_for_the_dense_model(model_dir, ids):
    m = FlattenModule(str(model_dir), distill_hidden=1.0)
    hd, student, _ = _hidden_terms(m, ids)
    assert len(student) == 6 and hd.item() == 0.0
    ce = m.model(input_ids=ids, labels=ids).loss
    assert m.training_step(ids, 0).item() == pytest.approx(ce.item(), rel=1e-6)  # loss = CE + 1.0 * 0
    assert all(not b._forward_hooks for b in m.student_blocks() + list(m.teacher().model.layers))


@pytest.mark.parametrize("norm", ["global", "token"])
def test_hidden_distillation_compares_pre_norm_block_outputs_with_the_groups_ends(model_dir, ids, norm):
    m = FlattenModule(str(model_dir), distill_hidden=0.5, distill_hidden_norm=norm)
    calib = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    m.record_plan(flatten_gpt(m.model, calib, CompressConfig(4), progress=False))
    hd, student, teacher = _hidden_terms(m, ids)
    assert hd.item() > 0
    # Reference from transformers' hidden_states: entry k is the output of block k-1, except the last entry,
    # which is the normed final state; so blocks 0..L'-2 are compared there and the last through the norm.
    m.model.eval()
    s_all = m.model(input_ids=ids, output_hidden_states=True).hidden_states
    t_all = m.teacher()(input_ids=ids, output_hidden_states=True).hidden_states
    g = m.teacher_indices()
    assert g == [grp[-1] for grp in m.plans[0].groups] and g[-1] == 5
    for i in range(3):
        assert torch.allclose(student[i], s_all[i + 1], atol=1e-5) and torch.equal(teacher[i], t_all[g[i] + 1])
    assert torch.allclose(m.model.model.norm(student[3]), s_all[-1], atol=1e-5)
    assert torch.allclose(m.teacher().model.norm(teacher[3]), t_all[-1], atol=1e-6)
    if norm == "global":
        terms = [F.mse_loss(s, t) / t.square().mean() for s, t in zip(student, teacher)]
    else:
        terms = [((s - t).norm(dim=-1) ** 2 / t.norm(dim=-1) ** 2).mean() for s, t in zip(student, teacher)]
    assert hd.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)
    ce = F.cross_entropy(m(ids)[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert m.training_step(ids, 0).item() == pytest.approx(ce.item() + 0.5 * hd.item(), rel=1e-5)


def test_hidden_distillation_gradient_reaches_the_lora_adapters_only(model_dir, ids):
    m = FlattenModule(str(model_dir), distill_hidden=1.0)
    calib = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    m.record_plan(flatten_gpt(m.model, calib, CompressConfig(4), progress=False))
    m.attach_lora(LoraSpec(r=2, alpha=4, dropout=0.0))
    hd, _, _ = _hidden_terms(m, ids)
    hd.backward()
    lora_b = [(n, p) for n, p in m.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 4 * 7  # 4 blocks x 7 projections; B starts at zero, so its gradient is the one that is non-zero
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora_b)
    assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)
    assert all(p.grad is None for p in m.teacher().parameters())


def test_hidden_distillation_maps_blocks_through_two_stages_and_a_resume(model_dir, ids):
    m = FlattenModule(str(model_dir), distill_hidden=1.0)
    calib = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    m.record_plan(flatten_gpt(m.model, calib, CompressConfig(5), progress=False))
    m.record_plan(flatten_gpt(m.model, calib, CompressConfig(4), progress=False))
    groups = compose_groups(m.plans, 6)
    assert [o for grp in groups for o in grp] == list(range(6)) and len(groups) == 4
    assert m.teacher_indices() == [grp[-1] for grp in groups]
    hd, _, _ = _hidden_terms(m, ids)
    ckpt = _checkpoint(m)
    fresh = FlattenModule(str(model_dir), distill_hidden=1.0)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    assert fresh.teacher_indices() == m.teacher_indices()
    assert _hidden_terms(fresh, ids)[0].item() == pytest.approx(hd.item(), rel=1e-6)


def test_distill_hidden_must_be_a_non_negative_number(model_dir):
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="distill_hidden must be a finite number >= 0"):
            FlattenModule(str(model_dir), distill_hidden=bad)
    with pytest.raises(ValueError, match="distill_hidden_norm 'l2' is not one of global, token"):
        FlattenModule(str(model_dir), distill_hidden=1.0, distill_hidden_norm="l2")
    assert FlattenModule(str(model_dir)).__dict__["_teacher"] is None  # no distillation: no teacher copy
    assert FlattenModule(str(model_dir), distill_hidden=0.1).__dict__["_teacher"] is not None


@pytest.fixture(scope="module")
def export_dir(model_dir, tmp_path_factory):
    """The tiny model compressed 6 -> 4 by the compression command."""
    out = tmp_path_factory.mktemp("export") / "model"
    argv = ["--model", str(model_dir), "--target-layers", "4", "--calib-file", WIKITEXT, "--calib-samples", "4", "--calib-seqlen", "32"]
    assert cli.main([*argv, "--out", str(out), "--quiet"]) == 0
    return out


def test_start_from_export_is_the_exported_model_with_its_plans(model_dir, export_dir, ids):
    m = FlattenModule(str(model_dir), distill_hidden=1.0)
    m.start_from_export(export_dir)
    exported = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    assert [p.to_dict() for p in m.plans] == plans_of(json.loads((export_dir / "compression_report.json").read_text()))
    m.eval()
    assert torch.equal(m(ids), exported(input_ids=ids).logits)
    assert m.teacher().config.num_hidden_layers == 6 and m.num_layers == 4
    assert all(p.requires_grad for p in m.parameters())
    assert _hidden_terms(m, ids)[0].item() > 0


def test_start_from_export_refuses_what_it_cannot_rebuild(model_dir, export_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no compression_report.json: it is not a compressed export"):
        FlattenModule(str(model_dir)).start_from_export(model_dir)
    with pytest.raises(PlanMismatchError, match="was compressed from .* but this module's source is"):
        FlattenModule(str(tiny_model_dir(tmp_path / "other", seed=1))).start_from_export(export_dir)
    m = FlattenModule(str(model_dir))
    m.start_from_export(export_dir)
    with pytest.raises(PlanMismatchError, match="start_from_export needs the freshly loaded dense model"):
        m.start_from_export(export_dir)
    peer = tmp_path / "peer"
    shutil.copytree(export_dir, peer)
    report = json.loads((peer / "compression_report.json").read_text())
    report["method"], report["stages"][0]["record"] = "shortgpt", {"removed": [1, 2]}
    (peer / "compression_report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="made by method 'shortgpt', whose report holds no FlattenGPT plan"):
        FlattenModule(str(model_dir)).start_from_export(peer)


def test_a_packaged_name_and_its_converted_directory_are_one_source(tmp_path, monkeypatch):
    """The compression command records the converted directory; a module built from the name must accept its export."""
    from flatten_lightning.lightning.module import same_source
    from flatten_lightning.sources import PACKAGED

    monkeypatch.setenv("FLATTEN_LIGHTNING_CACHE", str(tmp_path))
    names = sorted(PACKAGED)
    converted = tmp_path / PACKAGED[names[0]].hf_name
    converted.mkdir()
    assert same_source(names[0], str(converted)) and same_source(str(converted) + "/", names[0])
    assert not same_source(names[1], str(converted))  # another packaged model
    assert not same_source(names[0], str(tmp_path))  # another directory
