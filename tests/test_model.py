"""Composition invariants (SYSTEMS.md §0): registries, the merge count check, text-only == bare LM logits,
KV-cache generation == uncached generation, save/load round trip."""

import pytest
import torch
from PIL import Image

from conftest import LLAMA, make_model
from vlmlab.config import VisionConfig
from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.connectors import CONNECTORS
from vlmlab.models.encoders import ENCODERS
from vlmlab.models.merge import merge_image_features
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.registry import UnknownNameError

ENCODER_CONFIGS = {
    "clip": VisionConfig(
        name="clip",
        image_size=32,
        params={
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
    ),
    "siglip": VisionConfig(
        name="siglip",
        image_size=32,
        params={
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
    ),
    "idefics2_vit": VisionConfig(
        name="idefics2_vit",
        image_size=32,
        select_layer=-1,
        params={
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
    ),
    "idefics3_vit": VisionConfig(
        name="idefics3_vit",
        image_size=32,
        select_layer=-1,
        params={
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
    ),
    "blip_vit": VisionConfig(
        name="blip_vit",
        image_size=32,
        select_layer=-1,
        select_feature="cls_patch",
        params={
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
    ),
    "internvit": VisionConfig(
        name="internvit",
        image_size=32,
        select_layer=-1,
        params={
            "patch_size": [8, 8],
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
    ),
    "idefics_vit": VisionConfig(
        name="idefics_vit",
        image_size=32,
        select_layer=-1,
        select_feature="cls_patch",
        params={
            "patch_size": 8,
            "embed_dim": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
    ),
    "convnet": VisionConfig(name="convnet", image_size=32, params={"channels": [8, 16], "pool": 2}),
    "efficientnet-lite0": VisionConfig(name="efficientnet-lite0", image_size=64),
    "convnext": VisionConfig(
        name="convnext", image_size=32, params={"hidden_sizes": [8, 12, 16, 20], "depths": [1, 1, 1, 1]}
    ),
    "tiled": VisionConfig(  # 2 x 2 tiles of a ConvNet's 4 x 4 grid, no whole view: 64 rows
        name="tiled",
        image_size=64,
        params={"tower": "convnet", "grid": 2, "global_view": False, "channels": [8, 16], "pool": 2},
    ),
}


# Connectors that merge (or position) a square token grid, and the table's towers whose tokens are not one (a CLS row kept).
GRID_CONNECTORS = {
    "pixel_shuffle_mlp",
    "mlp_downsample",
    "idefics3",
    "qwen_vl_adapter",
    "minicpm_resampler",
    "sva",
}
CLS_TOWERS = {"blip_vit", "idefics_vit"}
# Towers that need more than pixels (Mllama's aspect-ratio ids and tile mask): tested with transformers' batches;
# towers that need their tiler (Fuyu: one view per patch): tested with it.
TESTED_ELSEWHERE = {
    "fuyu_patches": "tests/test_fuyu.py",  # one view per patch: needs the fuyu tiler
    "mllama_vit": "tests/interop/test_hf_mllama.py",
}


def conversation(q="What color is the shape?", a="red", n_images=1):
    return [{"role": "user", "content": "<image>" * n_images + "\n" + q}, {"role": "assistant", "content": a}]


# Connectors that read several towers (``multi_encoder``), tested with theirs: one tower is refused.
MULTI_TOWER_CONNECTORS = {"mgm": "tests/test_mgm.py"}


def test_every_encoder_is_covered_by_the_test_table():
    assert set(ENCODERS) == set(ENCODER_CONFIGS) | set(TESTED_ELSEWHERE)


@pytest.mark.parametrize("name", sorted(ENCODER_CONFIGS))
@pytest.mark.parametrize("connector", sorted(CONNECTORS))
def test_every_registry_entry_builds_and_runs(tokenizer, name, connector):
    # max_length: room for the query resamplers' default token counts (Qwen-VL: 256 rows; SVA: 24 x 25).
    build = lambda: make_model(tokenizer, vision=ENCODER_CONFIGS[name], connector=connector, max_length=1024)  # noqa: E731
    if connector in MULTI_TOWER_CONNECTORS:
        with pytest.raises(ConfigError, match="tower"):
            build()
        return
    if connector in GRID_CONNECTORS and name in CLS_TOWERS:
        # A space-to-channel merge needs a square grid: a tower that keeps its CLS row is refused when the model
        # is built, naming the problem (never a shape error at the first forward).
        with pytest.raises(ConfigError, match="square"):
            build()
        return
    if connector == "identity" and ENCODERS[name](ENCODER_CONFIGS[name]).hidden_size != LLAMA["hidden_size"]:
        with pytest.raises(ConfigError, match="identity connector"):  # it cannot change the width
            build()
        return
    model, proc = build()
    proc.config.image_size = ENCODER_CONFIGS[name].image_size
    batch = proc.collate([proc.encode(conversation(), [Image.new("RGB", (40, 30), "red")], train=True)])
    out = model(**batch)
    n_img = model.num_image_tokens
    assert (batch["input_ids"] == model.config.image_token_id).sum() == n_img
    assert out.logits.shape == (1, batch["input_ids"].shape[1], LLAMA["vocab_size"])
    assert torch.isfinite(out.loss)


def test_select_feature_drops_or_keeps_cls(tokenizer):
    base = ENCODER_CONFIGS["clip"]
    patch = ENCODERS["clip"](base)
    cls = ENCODERS["clip"](VisionConfig(**{**base.__dict__, "select_feature": "cls_patch"}))
    cls.load_state_dict(patch.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a, b = patch(x), cls(x)
    assert a.shape == (2, 16, 32) and b.shape == (2, 17, 32) and patch.num_tokens == 16
    torch.testing.assert_close(a, b[:, 1:])
    # select_layer = -2 is the penultimate hidden state.
    hs = patch.model(pixel_values=x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(a, hs[-2][:, 1:])


@pytest.mark.parametrize("registry,name", [(ENCODERS, "vit-huge"), (CONNECTORS, "qformerx")])
def test_unknown_names_list_the_valid_ones(registry, name):
    with pytest.raises(UnknownNameError) as e:
        registry[name]
    msg = str(e.value)
    assert name in msg and all(k in msg for k in registry) and "\n" not in msg


def test_merge_count_mismatch_raises():
    ids = torch.tensor([[5, 9, 9, 9, 7]])
    embeds = torch.zeros(1, 5, 4)
    merged = merge_image_features(embeds, ids, torch.ones(1, 3, 4), image_token_id=9)
    assert merged[0, 1:4].eq(1).all() and merged[0, [0, 4]].eq(0).all()
    with pytest.raises(SampleError, match="3 placeholder tokens .* 4 feature rows"):
        merge_image_features(embeds, ids, torch.ones(1, 4, 4), image_token_id=9)
    with pytest.raises(SampleError, match="3 placeholder tokens .* 6 feature rows"):
        merge_image_features(embeds, ids, torch.ones(2, 3, 4), image_token_id=9)


def test_merge_places_rows_in_order():
    ids = torch.tensor([[9, 9, 1], [2, 9, 9]])
    feats = torch.arange(2 * 2 * 3, dtype=torch.float).view(2, 2, 3)
    out = merge_image_features(torch.zeros(2, 3, 3), ids, feats, image_token_id=9)
    torch.testing.assert_close(out[0, :2], feats[0])
    torch.testing.assert_close(out[1, 1:], feats[1])


def test_text_only_equals_bare_lm_logits(tiny_model, tokenizer):
    model, proc = tiny_model
    batch = proc([[{"role": "user", "content": "How many shapes are there?"}]])
    ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    bare = model.language(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(ours, bare)


def test_kv_cache_generation_equals_uncached(tiny_model):
    model, proc = tiny_model
    imgs = [[Image.new("RGB", (32, 32), c)] for c in ("red", "blue", "green")]
    convs = [
        [{"role": "user", "content": "<image>\n" + q}]
        for q in ("What color is the shape?", "How many shapes are there? one two", "Where?")
    ]
    batch = proc(convs, imgs)
    assert batch["attention_mask"][:, 0].sum() < 3, "left padding expected in the batch"
    kw = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        max_new_tokens=12,
        pad_token_id=proc.pad_token_id,
    )
    cached = model.generate(**kw, use_cache=True)
    uncached = model.generate(**kw, use_cache=False)
    assert cached.shape[1] == 12
    assert torch.equal(cached, uncached)
    # Batched, left-padded generation equals one-at-a-time generation.
    for i in range(3):
        single = proc([convs[i]], [imgs[i]])
        one = model.generate(
            input_ids=single["input_ids"],
            attention_mask=single["attention_mask"],
            pixel_values=single["pixel_values"],
            max_new_tokens=12,
            pad_token_id=proc.pad_token_id,
        )
        assert torch.equal(one[0], cached[i])


def test_sampling_is_seeded_and_top_p_one_token_is_greedy(tiny_model):
    model, proc = tiny_model
    batch = proc(
        [[{"role": "user", "content": "<image>\nWhat shape is this?"}]], [[Image.new("RGB", (8, 8))]]
    )
    kw = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        max_new_tokens=8,
    )
    a = model.generate(**kw, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(1))
    b = model.generate(**kw, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    greedy = model.generate(**kw)
    nucleus = model.generate(**kw, do_sample=True, top_p=1e-6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy, nucleus)


def test_image_placeholders_without_pixels_raise(tiny_model):
    model, proc = tiny_model
    enc = proc.encode(conversation(), [Image.new("RGB", (8, 8))])
    with pytest.raises(SampleError, match="no pixel_values"):
        model(input_ids=enc["input_ids"][None])


def test_save_load_round_trip(tmp_path, tiny_model):
    import vlmlab

    model, proc = tiny_model
    vlmlab.save(model, proc, tmp_path / "m")
    model2, proc2 = vlmlab.load(tmp_path / "m")
    batch = proc.collate([proc.encode(conversation(), [Image.new("RGB", (30, 50), "blue")])])
    batch2 = proc2.collate([proc2.encode(conversation(), [Image.new("RGB", (30, 50), "blue")])])
    for k in ("input_ids", "labels", "pixel_values"):
        assert torch.equal(batch[k], batch2[k])
    assert torch.equal(model(**batch).logits, model2.eval()(**batch2).logits)


def test_loading_does_not_mutate_the_callers_config(tokenizer):
    model, _ = make_model(tokenizer)
    cfg = model.config
    before = cfg.to_dict()
    VisionLanguageModel(cfg, load_pretrained=False)
    assert cfg.to_dict() == before


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_any_hf_causal_decoder_text_only_equals_bare_lm(tokenizer, model_type):
    from vlmlab.config import LanguageConfig

    params = {k: v for k, v in LLAMA.items() if k != "bos_token_id"}
    model, proc = make_model(tokenizer, language=LanguageConfig(model_type=model_type, params=params))
    assert model.language.config.model_type == model_type
    batch = proc(
        [[{"role": "user", "content": "What shape is this?"}], [{"role": "user", "content": "Where?"}]]
    )
    ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    bare = model.language(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0),
    ).logits
    assert torch.equal(ours, bare)
    # And with an image, the model still runs end to end.
    enc = proc.encode(conversation(), [Image.new("RGB", (20, 20), "green")], train=True)
    assert torch.isfinite(model(**proc.collate([enc])).loss)


def test_bf16_autocast_forward_backward(tiny_model):
    model, proc = tiny_model
    enc = proc.encode(conversation(), [Image.new("RGB", (32, 32), "red")], train=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**proc.collate([enc]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.connector.layers[0].weight.grad is not None


def test_pretrained_towers_and_lms_load_from_safetensors_only(tmp_path, tokenizer):
    """A pretrained vision tower or decoder saved as safetensors loads; the same weights as a pickled .bin are
    refused (loading a pickle can run code)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from vlmlab.config import LanguageConfig

    torch.manual_seed(0)
    tower_cfg = ENCODER_CONFIGS["clip"]
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=32, **tower_cfg.params))
    lm = LlamaForCausalLM(LlamaConfig(**LLAMA))
    clip.save_pretrained(tmp_path / "clip")
    lm.save_pretrained(tmp_path / "lm")
    vision = VisionConfig(name="clip", image_size=32, pretrained=str(tmp_path / "clip"))
    model, proc = make_model(
        tokenizer, vision=vision, language=LanguageConfig(pretrained=str(tmp_path / "lm"))
    )
    for a, b in zip(model.language.parameters(), lm.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.vision.model.parameters(), clip.parameters()):
        assert torch.equal(a, b)
    # The saved model is self-contained: it loads after its pretrained sources are gone.
    import shutil

    import vlmlab

    vlmlab.save(model, proc, tmp_path / "saved")
    shutil.rmtree(tmp_path / "clip")
    shutil.rmtree(tmp_path / "lm")
    again, _ = vlmlab.load(tmp_path / "saved")
    for a, b in zip(again.parameters(), model.parameters()):
        assert torch.equal(a, b)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    lm.config.save_pretrained(pickled)
    torch.save(lm.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(Exception, match="safetensors"):
        make_model(tokenizer, language=LanguageConfig(pretrained=str(tmp_path / "pickled")))


def test_supervised_logits_only_gives_the_same_loss_and_gradients(tiny_model):
    """The trainer's path (LM head only at supervised positions) equals transformers' full-logits loss."""
    model, processor = tiny_model
    from PIL import Image

    img = Image.new("RGB", (40, 30), (200, 10, 10))
    samples = [
        processor.encode(
            [
                {"role": "user", "content": "<image>\nWhat color is the shape?"},
                {"role": "assistant", "content": a},
            ],
            [img],
            train=True,
        )
        for a in ("red", "a large red circle at the top left")
    ]
    batch = processor.collate(samples)
    model.train()
    full = model(**batch)
    grads_full = torch.autograd.grad(full.loss, [p for p in model.parameters()], allow_unused=True)
    fast = model(**batch, supervised_logits_only=True)
    grads_fast = torch.autograd.grad(fast.loss, [p for p in model.parameters()], allow_unused=True)
    torch.testing.assert_close(fast.loss, full.loss, atol=1e-6, rtol=1e-6)
    n_sup = int((batch["labels"][:, 1:] != -100).sum())
    assert fast.logits.shape == (n_sup, full.logits.shape[-1])
    for a, b in zip(grads_fast, grads_full):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_random_weights_of_a_pretrained_decoder_take_its_shape(tmp_path):
    """``load_pretrained=False`` with ``language.pretrained`` set and no ``params``: the pretrained model's
    architecture with random weights, not transformers' defaults (a 7B Llama)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import LLAMA
    from vlmlab.config import LanguageConfig
    from vlmlab.models.language import build_language_model

    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **LLAMA)).save_pretrained(tmp_path)
    model = build_language_model(LanguageConfig("llama", pretrained=str(tmp_path)), load_pretrained=False)
    assert model.config.hidden_size == LLAMA["hidden_size"]
    assert model.config.num_hidden_layers == LLAMA["num_hidden_layers"]


def test_extra_visual_inputs_reach_only_the_parts_that_name_them(tokenizer):
    """An input no part takes is refused with its name; ``pixel_values`` in transformers' padded view layout
    ``[N_img, P, 3, H, W]`` drop their all-zero padding views (and the same views of ``pixel_attention_mask``)."""
    from vlmlab.models.vlm import drop_padding_views

    model, proc = make_model(tokenizer)
    batch = proc.collate([proc.encode(conversation(), [Image.new("RGB", (40, 30), "red")], train=True)])
    with pytest.raises(SampleError, match="unexpected model input.*'foo'"):
        model.embed(batch["input_ids"], batch["pixel_values"], foo=torch.ones(1))
    views = torch.stack([batch["pixel_values"][0], torch.zeros_like(batch["pixel_values"][0])])[
        None
    ]  # [1, 2, ...]
    mask = torch.stack([torch.ones(32, 32), torch.zeros(32, 32)])[None]
    flat, extra = drop_padding_views(views, {"pixel_attention_mask": mask})
    assert flat.shape[0] == 1 and torch.equal(flat[0], batch["pixel_values"][0])
    assert extra["pixel_attention_mask"].shape == (1, 32, 32) and extra["pixel_attention_mask"].all()
    # The padded layout gives the model exactly what the flat one does (the tower takes no mask: none is passed).
    out_flat = model(**batch)
    out_padded = model(**{**batch, "pixel_values": views, "pixel_attention_mask": mask})
    assert torch.equal(out_flat.logits, out_padded.logits)
