"""Cambrian-1's Spatial Vision Aggregator (connectors/sva.py) and its re-aggregation inside the decoder
(fusion/sva.py, ``fusion.regional``), SYSTEMS.md §20 invariants: a query reads only its own region of every tower
(tower 0 also through the global context, the mean of its tokens); the output count does not depend on the
towers' resolutions; all queries are the same vector before attention. Inside the decoder: only the query
positions change, each from its own region; text-only input is the base LLM; cached = uncached generation; a frozen
LLM gets no gradient; the checkpoint round-trips. The presets: Cambrian-1-8B's numbers on the meta device, the
CPU-scale variant trains a step."""

import contextlib
import dataclasses

import pytest
import torch
from PIL import Image
from transformers import DynamicCache

import vlmlab
from conftest import LLAMA, train_step_with_frozen_llm
from vlmlab.config import (
    ConnectorConfig,
    FusionConfig,
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    RegionalConfig,
    VisionConfig,
)
from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.connectors.sva import SpatialVisionAggregator
from vlmlab.models.fusion.sva import regional
from vlmlab.models.language import cache_kwargs
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.presets import PRESETS
from vlmlab.processing.processor import Processor
from vlmlab.training.stages import apply_stage

G = 4
LOW = VisionConfig(name="convnet", image_size=32, params={"channels": [8, 16], "pool": 2})  # 4 x 4, width 16
HIGH = VisionConfig(name="convnet", image_size=64, params={"channels": [8, 12], "pool": 2})  # 8 x 8, width 12
SVA = {"grid": G, "grids": [4, 8], "dim": 16, "depth": 2, "heads": 2}


def token_of(cell: tuple[int, int]) -> int:
    """The output row of a query cell (row, col) when a newline follows each row of G."""
    return cell[0] * (G + 1) + cell[1]


def region_mask(side: int, cell: tuple[int, int]) -> torch.Tensor:
    """``[side * side]`` bool: the tokens of a side x side grid inside ``cell``'s region."""
    r = side // G
    grid = torch.zeros(side, side, dtype=torch.bool)
    grid[cell[0] * r : (cell[0] + 1) * r, cell[1] * r : (cell[1] + 1) * r] = True
    return grid.flatten()


@pytest.fixture
def sva():
    torch.manual_seed(0)
    # Three towers on 4 x 4, 8 x 8 and 12 x 12 grids: regions of 1, 4 and 9 tokens.
    return SpatialVisionAggregator([6, 5, 7], 24, grids=[4, 8, 12], grid=G, dim=16, depth=2, heads=2).eval()


def features(seed=1, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, s * s, d, generator=g) for s, d in ((4, 6), (8, 5), (12, 7))]


# -- the connector -------------------------------------------------------------------------------------------
def test_a_query_reads_only_its_own_region_and_tower_0_s_mean(sva):
    cell, other = (1, 2), (3, 0)
    feats = features()
    with torch.no_grad():
        out = sva(feats)
        regions, context = sva.regional_inputs(feats)
        for i, side in ((1, 8), (2, 12)):  # towers 1.. reach a query through its region only
            moved = [f.clone() for f in feats]
            moved[i][:, ~region_mask(side, cell)] += 3.0
            new = sva(moved)
            assert torch.equal(new[:, token_of(cell)], out[:, token_of(cell)])
            assert not torch.allclose(new[:, token_of(other)], out[:, token_of(other)])
            inside = [f.clone() for f in feats]
            inside[i][:, region_mask(side, cell)] += 3.0
            assert not torch.allclose(sva(inside)[:, token_of(cell)], out[:, token_of(cell)])
        # Tower 0 (the reference's SigLIP) also reaches every query through the global context, its mean ...
        moved = [f.clone() for f in feats]
        moved[0][:, ~region_mask(4, cell)] += 3.0
        assert not torch.allclose(sva(moved)[:, token_of(cell)], out[:, token_of(cell)])
        # ... and only through it: with the context held, its tokens outside the region do not matter either.
        moved_regions, _ = sva.regional_inputs(moved)
        held = sva.sample(moved_regions, context)
        assert torch.equal(held[:, token_of(cell)], out[:, token_of(cell)])
        assert torch.equal(sva.sample(regions, context), out)
        # Each image is its own: the second image's queries ignore the first image.
        moved = [f.clone() for f in feats]
        for f in moved:
            f[0] += 1.0
        assert torch.equal(sva(moved)[1], out[1])


def test_the_output_count_does_not_depend_on_the_towers_resolutions(sva):
    n_rows = G * (G + 1)  # 16 queries and a newline after each row of 4
    for sides in ((4, 8, 12), (3, 5, 7), (9, 16, 27)):  # towers' own grids, resized to 4, 8, 12
        feats = [torch.randn(2, s * s, d) for s, d in zip(sides, (6, 5, 7))]
        assert sva.num_tokens([s * s for s in sides]) == n_rows
        assert sva(feats).shape == (2, n_rows, 24)
    rows = sva(features()).view(2, G, G + 1, 24)
    assert torch.equal(rows[:, :, G], sva.newline.expand(2, G, 24))  # the learned newline closes each row
    plain = SpatialVisionAggregator([5], 24, grids=[8], grid=G, dim=16, newline=False)
    assert plain.num_tokens([100]) == G * G and plain(features()[1:2]).shape == (2, G * G, 24)
    with pytest.raises(ConfigError, match="not a square grid"):
        sva.num_tokens([16, 64, 145])


def test_queries_are_one_vector_that_differs_only_by_its_region(sva):
    assert sva.query.shape == (16,)  # one learned vector for every cell
    # Towers whose every token is the same: every region is the same, so every query comes out the same.
    flat = [torch.randn(1, 1, d).expand(1, s * s, d) for s, d in ((4, 6), (8, 5), (12, 7))]
    with torch.no_grad():
        out = sva(flat).view(G, G + 1, 24)[:, :G].reshape(G * G, 24)
    torch.testing.assert_close(out, out[:1].expand_as(out), rtol=0, atol=1e-6)


def test_bad_connector_settings_fail_with_one_line():
    with pytest.raises(ConfigError, match="grids: 1 grid sides for 2 towers"):
        SpatialVisionAggregator([4, 4], 8, grids=[4])
    with pytest.raises(ConfigError, match=r"grids: \[6\] are not multiples of grid 4"):
        SpatialVisionAggregator([4, 4], 8, grids=[4, 6], grid=4)
    with pytest.raises(ConfigError, match="heads"):
        SpatialVisionAggregator([4], 8, grids=[4], grid=4, dim=10, heads=4)


# -- inside the decoder ---------------------------------------------------------------------------------------
def config(tokenizer, layers=(0, 1), connector="sva"):
    return ModelConfig(
        vision=LOW,
        extra_vision=[HIGH],
        connector=ConnectorConfig(name=connector, params=dict(SVA) if connector == "sva" else {}),
        language=LanguageConfig(model_type="llama", params=dict(LLAMA)),
        processor=ProcessorConfig(image_size=64, max_length=128),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        fusion=FusionConfig(mode=None, regional=RegionalConfig(layers=list(layers))),
    )


@pytest.fixture
def cambrian(tokenizer):
    torch.manual_seed(0)
    model = VisionLanguageModel(config(tokenizer)).eval()
    return model, Processor(tokenizer, model.config.processor, model.num_image_tokens)


def without_regional(model):
    """The same model (same weights) with no re-aggregation inside the decoder."""
    base = VisionLanguageModel(dataclasses.replace(model.config, fusion=None)).eval()
    result = base.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys and all(k.startswith("regional_attn.") for k in result.unexpected_keys)
    return base


def image(colour, size=(40, 30)):
    return Image.new("RGB", size, colour)


def chat(proc, content, images):
    return proc([[{"role": "user", "content": content}]], [images])


def layer_output(model, batch, i=0):
    """Decoder layer ``i``'s output (after the re-aggregation hook) for ``batch``."""
    seen = []
    handle = model.language.get_decoder().layers[i].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen[0][0]


def test_only_the_query_positions_change_and_text_only_input_is_the_base_llm(cambrian):
    model, proc = cambrian
    assert model.num_image_tokens == G * (G + 1) and sorted(model.regional_attn) == ["0", "1"]
    base = without_regional(model)
    text = chat(proc, "What color?", [])
    plain = model.language(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).logits
    assert torch.equal(model(**text).logits, plain)
    b = chat(proc, "Look: <image> What color?", [image("red")])
    ids = b["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero().flatten()
    queries = img.view(G, G + 1)[:, :G].flatten()  # the newline positions are not queries
    ours, theirs = layer_output(model, b), layer_output(base, b)
    changed = (ours != theirs).any(-1)
    assert changed[queries].all() and changed.sum() == len(queries)
    with torch.no_grad():
        a, c = model(**b).logits[0], base(**b).logits[0]
    first = int(img[0])
    assert torch.equal(a[:first], c[:first])  # causal: nothing before the first query changes
    assert not torch.allclose(
        a[-1], c[-1], atol=1e-4
    )  # the text after the image reads the re-aggregated rows
    # The layer's own residual: with its output projection at zero the decoder is the base LLM.
    with torch.no_grad():
        for block in model.regional_attn.values():
            block.proj_out[-1].weight.zero_()
        assert torch.equal(model(**b).logits, base(**b).logits)


def test_a_query_position_re_reads_its_own_region_of_its_own_image(cambrian):
    model, proc = cambrian
    b = chat(proc, "One <image> two <image>?", [image("red"), image("blue")])
    ids = b["input_ids"]
    img = (ids[0] == model.config.image_token_id).nonzero().flatten().view(2, G, G + 1)
    cell, other = (2, 1), (0, 3)
    decoder = model.language.get_decoder()
    with torch.no_grad():
        embeds = model.embed(ids, b["pixel_values"])
        feats = model.tower_features(b["pixel_values"])
    outputs = []
    handle = decoder.layers[0].register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    for moved in (False, True):
        f = [x.clone() for x in feats]
        if moved:  # the high-resolution tower of the second image, outside the cell's region
            f[1][1, ~region_mask(8, cell)] += 3.0
        with torch.no_grad(), regional(decoder, model.connector, f, ids, model.config.image_token_id):
            decoder(inputs_embeds=embeds, attention_mask=b["attention_mask"])
    handle.remove()
    same, moved = outputs
    assert torch.equal(moved[img[1, cell[0], cell[1]]], same[img[1, cell[0], cell[1]]])
    assert not torch.allclose(moved[img[1, other[0], other[1]]], same[img[1, other[0], other[1]]])
    assert torch.equal(moved[img[0]], same[img[0]])  # the first image's queries read the first image


def test_cached_generation_equals_uncached_and_the_checkpoint_round_trips(cambrian, tmp_path):
    model, proc = cambrian
    b = proc(
        [
            [{"role": "user", "content": "<image> What?"}],
            [{"role": "user", "content": "Hi <image> and <image>?"}],
        ],
        [[image("red")], [image("blue"), image("green", (30, 50))]],
    )
    cached = model.generate(**b, max_new_tokens=8)
    assert torch.equal(cached, model.generate(**b, max_new_tokens=8, use_cache=False))
    # A prompt prefilled in two pieces through a KV cache, cut inside an image's run: each piece updates the
    # query positions it covers, as one uncached pass does.
    decoder = model.language.get_decoder()
    one = {k: v[1:] for k, v in b.items() if k != "pixel_values"}
    pixels = b["pixel_values"][1:]
    ids, mask = one["input_ids"], one["attention_mask"]
    cut = int((ids[0] == model.config.image_token_id).nonzero()[7])
    with torch.no_grad(), model.fused(ids, pixels):
        embeds = model.embed(ids, pixels)
        full = decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        cache = DynamicCache(config=model.language.config)
        kw = cache_kwargs(decoder, cache)
        first = decoder(inputs_embeds=embeds[:, :cut], attention_mask=mask[:, :cut], use_cache=True, **kw)
        rest = decoder(inputs_embeds=embeds[:, cut:], attention_mask=mask, use_cache=True, **kw)
    pieces = torch.cat([first.last_hidden_state, rest.last_hidden_state], dim=1)
    torch.testing.assert_close(pieces, full, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "m")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.fusion == model.config.fusion
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, model(**b).logits)
    # The decoder's keys are the base LLM's: the aggregation layers live under regional_attn.
    assert set(model.language.state_dict()) == set(without_regional(model).language.state_dict())
    assert "regional_attn.0.proj_in.weight" in model.state_dict()


def test_the_towers_run_once_per_forward_generate_and_served_prefill(cambrian):
    """The connector (via ``embed``) and the in-decoder re-aggregation read the same tower features: one run of
    each tower per call, with the outputs and gradients of running them twice."""
    from vlmlab.inference.batch import DecodeBatch

    model, proc = cambrian
    b = chat(proc, "Look: <image> What color?", [image("red")])
    runs = []
    handles = [
        t.register_forward_hook(lambda m, a, o: runs.append(m)) for t in (model.vision, *model.extra_vision)
    ]
    with torch.no_grad():
        logits = model(**b).logits
    assert len(runs) == 2  # two towers, once each
    runs.clear()
    tokens = model.generate(**b, max_new_tokens=3)
    assert len(runs) == 2
    runs.clear()
    DecodeBatch(model, context=128).add("row", b["input_ids"], pixel_values=b["pixel_values"])
    assert len(runs) == 2
    for h in handles:
        h.remove()

    # The same numbers as two separate runs (the record turned off): logits, tokens and every gradient.
    def loss_and_grads():
        model.zero_grad()
        out = model(**{**b, "labels": b["input_ids"]})
        out.loss.backward()
        return out.logits.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    shared = loss_and_grads()
    model._towers_once = contextlib.nullcontext
    twice = loss_and_grads()
    del model._towers_once
    assert torch.equal(shared[0], twice[0]) and torch.equal(logits, twice[0])
    assert shared[1].keys() == twice[1].keys() and any(n.startswith("vision.") for n in shared[1])
    for n in shared[1]:
        torch.testing.assert_close(shared[1][n], twice[1][n], rtol=1e-6, atol=1e-7, msg=n)
    assert torch.equal(tokens, model.generate(**b, max_new_tokens=3))


def test_frozen_llm_gets_no_gradient(cambrian):
    model, proc = cambrian
    train_step_with_frozen_llm(model, proc)  # asserts the LLM gets no gradient
    trained = model.part_parameters("connector") + model.part_parameters("fusion")
    assert all(p.grad is not None for p in trained)
    assert {id(p) for p in model.regional_attn.parameters()} == {
        id(p) for p in model.part_parameters("fusion")
    }


def test_bad_settings_fail_with_one_line(cambrian, tokenizer):
    model, proc = cambrian
    with pytest.raises(ConfigError, match="has no regions to re-read"):
        VisionLanguageModel(config(tokenizer, connector="mlp2x_gelu"))
    with pytest.raises(ConfigError, match="fusion.regional.layers: 5 is not a layer of a 2-layer decoder"):
        VisionLanguageModel(config(tokenizer, layers=(5,)))
    tiled = config(tokenizer)
    tiled.processor.tiler = "dynamic"
    with pytest.raises(ConfigError, match="one view per image"):
        VisionLanguageModel(tiled)
    b = chat(proc, "<image> What?", [image("red")])
    with pytest.raises(SampleError, match="do not match"):
        model(**{**b, "pixel_values": torch.cat([b["pixel_values"]] * 2)})


# -- presets ----------------------------------------------------------------------------------------------------
def test_cambrian_preset_has_cambrian_1_8b_s_numbers():
    preset = PRESETS["cambrian"]()
    with torch.device("meta"):
        model = VisionLanguageModel(preset.config, load_pretrained=False)
    towers = [model.vision, *model.extra_vision]
    assert [t.hidden_size for t in towers] == [
        1152,
        1024,
        1536,
        5760,
    ]  # SigLIP, CLIP-L, DINOv2-g, ConvNeXt-XXL
    assert [t.num_tokens for t in towers] == [27 * 27, 24 * 24, 27 * 27, 256 * 256]
    sva = model.connector
    assert (sva.grid, sva.sides, sva.dim, len(sva.layers)) == (24, [1, 1, 1, 4], 1024, 3)
    assert model.num_image_tokens == 576 + 24  # the queries and a newline per row
    assert sorted(int(i) for i in model.regional_attn) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert model.regional_attn["0"].proj_in.in_features == 4096 + 1024  # the decoder's width
    lm = sum(p.numel() for p in model.part_parameters("language"))
    assert 8.0e9 < lm < 8.1e9  # Llama-3-8B
    vision = {id(p) for p in model.part_parameters("vision")}
    language = {id(p) for p in model.part_parameters("language")}
    pretrain, finetune = ({id(p) for g in apply_stage(model, s) for p in g["params"]} for s in preset.recipe)
    assert pretrain == {id(p) for p in model.part_parameters("connector") + model.part_parameters("fusion")}
    assert language <= finetune and not (pretrain | finetune) & vision  # the towers stay frozen
    with pytest.raises(ConfigError, match="language.pretrained"):
        preset.make_tokenizer()


def test_cambrian_tiny_trains_a_step(tokenizer):
    preset = PRESETS["cambrian-tiny"]()
    torch.manual_seed(0)
    model, proc = vlmlab.build(dataclasses.replace(preset, make_tokenizer=lambda: tokenizer))
    assert model.num_image_tokens == 20 and sorted(model.regional_attn) == ["0", "2"]
    assert [t.num_tokens for t in (model.vision, *model.extra_vision)] == [16, 64]  # 32 and 64 px
    conv = [{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": "red"}]
    batch = proc.collate([proc.encode(conv, [image("red", (90, 60))], train=True)] * 2)
    apply_stage(model, preset.recipe[1])
    model.train()
    model(**batch, supervised_logits_only=True).loss.backward()
    assert all(p.grad is None for p in model.part_parameters("language"))
    assert all(p.grad is not None for p in model.part_parameters("fusion"))
