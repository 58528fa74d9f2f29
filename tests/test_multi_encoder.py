"""Several vision towers on one image (``ModelConfig.extra_vision``, models/encoders/multi.py): each tower reads
the processor's view at its own size and normalisation; a plain connector gets the towers' features concatenated
on the primary's grid, a multi-encoder connector gets the list; the towers train as the ``vision`` part; the
configuration round-trips."""

import dataclasses

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import LLAMA
from vlmlab.config import ConnectorConfig, LanguageConfig, ModelConfig, ProcessorConfig, VisionConfig
from vlmlab.errors import ConfigError
from vlmlab.models.connectors import CONNECTORS
from vlmlab.models.encoders.multi import concat_on_grid, resize_grid, tower_view
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.processing.processor import Processor
from vlmlab.processing.transforms import image_to_tensor

LOW = VisionConfig(name="convnet", image_size=32, params={"channels": [8, 16], "pool": 2})  # 4 x 4 tokens
HIGH = VisionConfig(
    name="convnet",
    image_size=64,
    params={"channels": [8, 12], "pool": 2},
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.25, 0.25, 0.25),
)  # 8 x 8 tokens, its own normalisation


def config(tokenizer, connector="mlp2x_gelu", extra=(HIGH,)):
    return ModelConfig(
        vision=LOW,
        extra_vision=list(extra),
        connector=ConnectorConfig(name=connector),
        language=LanguageConfig(model_type="llama", params=dict(LLAMA)),
        processor=ProcessorConfig(image_size=64, max_length=96),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )


def test_each_tower_sees_the_image_at_its_own_size_and_normalisation():
    proc = ProcessorConfig(image_size=64)
    image = Image.effect_noise((64, 64), 40).convert("RGB")
    x = image_to_tensor(image, proc)[None]
    assert torch.equal(tower_view(x, proc, dataclasses.replace(LOW, image_size=64)), x)  # same view: as it is
    own = tower_view(x, proc, HIGH)  # same size, its own mean/std: the same pixels, re-normalised
    want = image_to_tensor(
        image, dataclasses.replace(proc, image_mean=HIGH.image_mean, image_std=HIGH.image_std)
    )
    torch.testing.assert_close(own[0], want, atol=1e-5, rtol=1e-5)
    assert tower_view(x, proc, LOW).shape == (1, 3, 32, 32)


def test_grid_concatenation():
    a, b = torch.randn(2, 16, 3), torch.randn(2, 64, 5)
    out = concat_on_grid([a, b])
    assert out.shape == (2, 16, 8) and torch.equal(out[..., :3], a)
    # A constant grid stays constant when resized; the layout is row-major.
    assert torch.allclose(resize_grid(torch.ones(1, 64, 2), 4), torch.ones(1, 16, 2))
    with pytest.raises(ConfigError, match="not a square grid"):
        concat_on_grid([torch.randn(1, 15, 3), b])


def test_two_towers_concatenated_feed_a_plain_connector(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = VisionLanguageModel(config(tokenizer)).eval()
    assert model.connector.layers[0].in_features == 16 + 12  # both towers' widths
    assert model.num_image_tokens == 16  # the primary's grid
    vision = {id(p) for p in model.part_parameters("vision")}
    assert {id(p) for p in model.extra_vision.parameters()} <= vision
    proc = Processor(tokenizer, model.config.processor, model.num_image_tokens)
    b = proc([[{"role": "user", "content": "<image> What?"}]], [[Image.new("RGB", (50, 40), "red")]])
    assert b["pixel_values"].shape[-1] == 64
    with torch.no_grad():
        pv = b["pixel_values"]
        low = model.vision(tower_view(pv, model.config.processor, LOW))
        high = model.extra_vision[0](tower_view(pv, model.config.processor, HIGH))
        assert torch.equal(model.encode_images(pv), model.connector(concat_on_grid([low, high])))
        logits = model(**b).logits
    model.save_pretrained(tmp_path / "m")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.extra_vision == model.config.extra_vision
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, logits)


class ListConnector(nn.Module):
    """A multi-encoder connector for the test: each tower projected, the grids added on the primary's."""

    multi_encoder = True

    def __init__(self, in_dim, out_dim):
        super().__init__()
        assert isinstance(in_dim, list)
        self.projs = nn.ModuleList(nn.Linear(d, out_dim) for d in in_dim)

    def num_tokens(self, n_vis):
        assert isinstance(n_vis, list)
        return n_vis[0]

    def forward(self, feats):
        side = int(feats[0].shape[1] ** 0.5)
        return sum(p(resize_grid(f, side)) for p, f in zip(self.projs, feats))


def test_a_multi_encoder_connector_gets_every_tower(tokenizer, monkeypatch):
    monkeypatch.setitem(CONNECTORS, "list_test", ListConnector)
    torch.manual_seed(0)
    model = VisionLanguageModel(config(tokenizer, "list_test")).eval()
    seen = []
    model.connector.register_forward_pre_hook(lambda m, args: seen.append([a.shape for a in args[0]]))
    model.encode_images(torch.randn(2, 3, 64, 64))
    assert seen == [[(2, 16, 16), (2, 64, 12)]]


def test_bad_extra_vision_settings_fail_with_one_line(tokenizer):
    d = config(tokenizer).to_dict()
    d["extra_vision"] = {"name": "convnet"}
    with pytest.raises(ConfigError, match="config.extra_vision: expected a list"):
        ModelConfig.from_dict(d)
    d["extra_vision"] = [{"name": "convnet", "nope": 1}]
    with pytest.raises(ConfigError, match=r"config.extra_vision\[0\]: unknown field"):
        ModelConfig.from_dict(d)
