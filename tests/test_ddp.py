"""DDP on two CPU processes (gloo): sharded calibration + all-reduced statistics = one process on all windows.

Both runs go through ``python train.py`` (Lightning's DDP launcher re-runs the script per rank). The
learning rate is 0 so the exported weights are the compressed weights (LoRA's B starts at zero, so
merging changes nothing), while the rewrapped DDP model and its optimizer still run a real step.
The model runs in float64. Sharding changes how the calibration windows are batched, so the two runs
differ in the last bits of every activation; the refits amplify that through three sequential merges
(with GCV, which picks ridges down to 1e-6 of the mean eigenvalue on this random model, to ~4e-8 relative
in float64; ~5e-3 relative on small float32 elements). Wrong sharding or a missing all-reduce gives O(1)
differences and different plans, which is what this test must catch. Run twice: the defaults, and GCV
with the fast mode's channels by energy (the other two statistics that are reduced across ranks).
"""

import pytest
import torch
from lightning_helpers import exported_state, report, run_train, tiny_config, tiny_model_dir, write_config

from flatten_lightning.report import plans_of


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.mark.parametrize("settings", [{}, {"fit_ridge": "gcv", "fast": True}], ids=["defaults", "gcv-fast"])
def test_two_ranks_choose_the_same_plan_and_weights_as_one(model_dir, tmp_path, settings):
    schedule = [{"step": 0, "target_layers": 5}, {"step": 1, "target_layers": 3}]
    runs = {}
    for name, devices, strategy in (("one", 1, "auto"), ("two", 2, "ddp")):
        cfg = tiny_config(model_dir, tmp_path / name, schedule, max_steps=2, lr=0.0, devices=devices, strategy=strategy, dtype="float64")
        cfg["trainer"]["callbacks"][0]["init_args"] |= settings
        proc = run_train(["fit", "--config", str(write_config(cfg, tmp_path / f"{name}.yaml"))])
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = tmp_path / name / "model"
    assert "on 4 calibration windows per rank" in proc.stderr + proc.stdout  # 8 windows shared by 2 ranks
    one, two = report(runs["one"]), report(runs["two"])
    assert two["training"]["devices"] == 2
    assert [p["groups"] for p in plans_of(one)] == [p["groups"] for p in plans_of(two)]
    assert [[s["kept_kv_groups"], s["kept_channels"]] for p in plans_of(one) for s in p["steps"]] == [
        [s["kept_kv_groups"], s["kept_channels"]] for p in plans_of(two) for s in p["steps"]
    ]
    a, b = exported_state(runs["one"]), exported_state(runs["two"])
    assert a.keys() == b.keys()
    assert all(a[k].dtype == torch.float64 for k in a)
    ridges = [[s["ridge"][k] for p in plans_of(r) for s in p["steps"] for k in ("attention", "mlp")] for r in (one, two)]
    assert ridges[0] == pytest.approx(ridges[1], rel=1e-9)  # the same ridges (GCV's choices too)
    for k in a:  # same weights up to the conditioning of the refits (see the module docstring)
        assert (a[k] - b[k]).abs().max().item() <= 1e-6 * max(1.0, a[k].abs().max().item()), k
