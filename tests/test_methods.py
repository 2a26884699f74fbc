"""The method registry: one dispatch for the CLI, the callback and the benchmarks; options checked up front."""

import pytest
from conftest import WIKITEXT, make_tiny

from callbacks import FlattenCallback
from flatten_lightning import methods as M
from flatten_lightning.cli import main
from flatten_lightning.compress import CompressConfig


def test_flatten_is_our_recipe_and_flatten_paper_the_papers():
    assert M.compress_config("flatten", 5) == CompressConfig(5)
    assert M.compress_config("flatten-paper", 5) == CompressConfig.paper(5)
    cfg = M.compress_config("flatten", 5, fit_ridge=0.1, correction="flattened", offload=True, input_stride=2)
    assert (cfg.fit_ridge, cfg.correction, cfg.offload, cfg.input_stride) == (0.1, "flattened", True, 2)
    # Execution settings apply to the paper's recipe too, recipe settings do not.
    assert M.compress_config("flatten-paper", 5, offload=True, input_stride=0).offload
    with pytest.raises(ValueError, match="fixes fit_ridge"):
        M.compress_config("flatten-paper", 5, fit_ridge=0.1)
    with pytest.raises(ValueError, match="unknown compression setting"):
        M.compress_config("flatten", 5, ridge=0.1)


def test_compress_with_refuses_options_a_method_cannot_take(calib_ids):
    with pytest.raises(ValueError, match="takes no option"):
        M.compress_with("shortgpt", make_tiny("llama"), calib_ids, 4, fit_ridge=0.1)
    with pytest.raises(ValueError, match="unknown method"):
        M.compress_with("slicegpt", make_tiny("llama"), calib_ids, 4)


def test_the_callback_uses_the_same_recipes():
    cb = FlattenCallback(target_layers=4, correction="flattened", offload=True, input_stride=0)
    assert M.compress_config(cb.method, 4, **cb.settings) == CompressConfig(
        4, correction="flattened", feedback=0.0, refit_passes=0, offload=True, input_stride=0
    )
    with pytest.raises(ValueError, match="fixes fit_ridge"):  # at construction, i.e. when the YAML is parsed
        FlattenCallback(target_layers=4, method="flatten-paper", fit_ridge=0.1)


def _argv(tmp_path, *extra):
    return [
        "--model",
        str(tmp_path / "never-loaded"),
        "--target-layers",
        "4",
        "--calib-file",
        WIKITEXT,
        "--out",
        str(tmp_path / "o"),
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, flag",
    [(["--method", "shortgpt", "--fit-ridge", "0.1"], "--fit-ridge"), (["--method", "flatten", "--score-windows", "2"], "--score-windows")],
)
def test_cli_refuses_a_flag_the_method_cannot_use_before_loading(tmp_path, capsys, extra, flag):
    assert main(_argv(tmp_path, *extra)) == 2  # the model path does not exist: it was never loaded
    err = capsys.readouterr().err
    assert flag in err and "cannot be used with --method" in err


def test_cli_scores_sleb_on_the_asked_windows(tiny_dir, tmp_path):
    import json

    argv = ["--model", str(tiny_dir), "--target-layers", "5", "--calib-file", WIKITEXT, "--calib-samples", "4", "--calib-seqlen", "16"]

    def first_step(out: str, *extra: str) -> dict:
        assert main([*argv, "--method", "sleb", *extra, "--out", str(tmp_path / out), "--quiet"]) == 0
        return json.loads((tmp_path / out / "compression_report.json").read_text())["stages"][0]["record"]["steps"][0]

    one, every = first_step("one", "--score-windows", "1"), first_step("all")
    assert len(one["scores"]) == len(every["scores"]) == 6
    assert one["scores"] != every["scores"]  # scored on 1 window, not on the 4: the flag reached SLEB


def test_callback_takes_the_recipe_levers_and_refuses_them_for_the_paper():
    cb = FlattenCallback(target_layers=4, feedback=0.5, ridge_floor=0.1, refit_passes=1, fast=True, input_fit=True)
    assert {k: cb.settings[k] for k in ("feedback", "ridge_floor", "refit_passes", "fast", "input_fit")} == {
        "feedback": 0.5,
        "ridge_floor": 0.1,
        "refit_passes": 1,
        "fast": True,
        "input_fit": True,
    }
    assert "fast" not in FlattenCallback(target_layers=4).settings  # null: the method's recipe decides
    with pytest.raises(ValueError, match="fixes feedback"):
        FlattenCallback(target_layers=4, method="flatten-paper", feedback=0.5)
    with pytest.raises(ValueError, match="fixes fast"):
        FlattenCallback(target_layers=4, method="flatten-paper", fast=True)
    assert FlattenCallback(target_layers=4, channel_score="energy").settings["channel_score"] == "energy"
    with pytest.raises(ValueError, match="fixes channel_score"):
        FlattenCallback(target_layers=4, method="flatten-paper", channel_score="energy")


def test_our_levers_step_aside_when_the_user_turns_off_what_they_need():
    """feedback needs the sequential target and head_score='leverage' the o_proj refit: turning those off
    through the registry gives a valid recipe, while an explicit conflicting lever is still refused."""
    cfg = M.compress_config("flatten", 5, correction="flattened")
    assert (cfg.feedback, cfg.refit_passes, cfg.head_score) == (0.0, 0, "leverage")
    assert M.compress_config("flatten", 5, refit_attention=False).head_score == "importance"
    with pytest.raises(ValueError, match="correction='sequential'"):
        M.compress_config("flatten", 5, correction="flattened", feedback=0.5)
