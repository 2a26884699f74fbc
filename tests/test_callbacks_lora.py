"""LoRACallback: adapters only after the last stage, optimizer over adapters only, merged before export."""

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningCLI
from lightning_helpers import exported_state, tiny_config, tiny_model_dir, write_config

import train
from flatten_lightning.lora import LoraSpec, add_lora, check_targets, merge_lora


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


class Probe(Callback):
    """Records, per training step, the depth, whether adapters exist, and what the optimizer holds."""

    def __init__(self):
        self.seen: list[tuple[int, int, bool, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        opt = [names[id(p)] for g in trainer.optimizers[0].param_groups for p in g["params"]]
        self.seen.append((trainer.global_step, pl_module.num_layers, pl_module.lora_spec is not None, all("lora_" in n for n in opt)))


def fit_with(cfg: dict, tmp_path, *callbacks: Callback) -> LightningCLI:
    """The CLI builds everything from the config; ``callbacks`` (in-memory probes) run after the configured ones."""
    cli = train.main(["--config", str(write_config(cfg, tmp_path / "cfg.yaml"))], run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def test_adapters_come_after_the_last_stage_and_are_merged(model_dir, tmp_path):
    run = tmp_path / "run"
    probe = Probe()
    cfg = tiny_config(model_dir, run, [{"step": 0, "target_layers": 5}, {"step": 3, "target_layers": 4}], max_steps=5)
    cli = fit_with(cfg, tmp_path, probe)
    # Full-parameter recovery between the stages; adapters (and only they in the optimizer) after the last.
    assert [s[:3] for s in probe.seen] == [(0, 5, False), (1, 5, False), (2, 5, False), (3, 4, True), (4, 4, True)]
    assert [s[3] for s in probe.seen] == [False, False, False, True, True]
    state = exported_state(run / "model")
    assert not any("lora" in k for k in state) and cli.model.lora_spec is None


def test_without_compression_adapters_start_at_train_start(model_dir, tmp_path):
    cfg = tiny_config(model_dir, tmp_path / "run", max_steps=2)
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "FlattenCallback" not in c["class_path"]]
    probe = Probe()
    fit_with(cfg, tmp_path, probe)
    assert [s[1:] for s in probe.seen] == [(6, True, True), (6, True, True)]


def test_merge_keeps_the_function(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    peft_model = add_lora(model, LoraSpec(r=2, alpha=4, dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    before = peft_model(input_ids=ids).logits
    merged = merge_lora(peft_model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert torch.allclose(merged(input_ids=ids).logits, before, atol=1e-5)


def test_missing_target_module_fails_early_naming_it_and_the_choices(model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(model_dir, run)
    lora = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("LoRACallback"))
    lora["init_args"]["target_modules"] = ["q_proj", "w_gate"]
    with pytest.raises(
        ValueError,
        match=r"LoRA target module\(s\) 'w_gate' not found .*Available Linear module names: "
        r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
    ):
        train.main(["fit", "--config", str(write_config(cfg, tmp_path / "cfg.yaml"))])
    assert not (run / "model").exists()


def test_check_targets_accepts_existing_names(model_dir):
    from transformers import AutoModelForCausalLM

    check_targets(AutoModelForCausalLM.from_pretrained(model_dir), ["q_proj", "down_proj", "lm_head"])
