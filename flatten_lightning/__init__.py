"""flatten-lightning: FlattenGPT depth compression (arXiv 2602.08858) as a library.

This package holds the maths on tensors and Hugging Face modules and knows nothing of Lightning
(except ``flatten_lightning.lightning``, what Lightning runs); ``callbacks/`` hooks it into a run.

Public API::

    from flatten_lightning import CompressConfig, flatten_gpt, load_model
    model, tok = load_model("smollm2")
    plan = flatten_gpt(model, calib_ids, CompressConfig(target_layers=24))   # in place
    rebuild_structure(fresh_dense_model, plan)                                # replay the shapes
"""

from flatten_lightning.compress import CompressConfig, Plan, Step, flatten_gpt, rebuild_structure
from flatten_lightning.sources import load_model

__version__ = "0.1.0"
__all__ = ["CompressConfig", "Plan", "Step", "flatten_gpt", "load_model", "rebuild_structure"]
