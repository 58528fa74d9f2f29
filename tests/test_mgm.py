"""Mini-Gemini (SYSTEMS.md §16): patch info mining (``connectors/mgm.py``) against the reference formula and its
invariants (locality, the zero-value identity, the LR grid fixing the output count), MGM-HD's tiles and global
view, the ConvNeXt tower (``encoders/convnext.py``) against transformers' stages, the ``<h>`` image-prompt hook
in ``answer`` and the server, and the presets (real scale on the meta device, the tiny one trains)."""

import json

import httpx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ConvNextConfig, ConvNextModel

import vlmlab
from conftest import LLAMA, make_model
from serving.conftest import API_KEY, MODEL_NAME, image_message, make_app, running_server
from vlmlab.config import ConnectorConfig, LanguageConfig, ModelConfig, ProcessorConfig, VisionConfig
from vlmlab.errors import ConfigError
from vlmlab.inference.chat import answer
from vlmlab.inference.image_prompt import split_image_prompt
from vlmlab.models.connectors.mgm import MGMConnector
from vlmlab.models.encoders.convnext import ConvNextTower
from vlmlab.models.encoders.tiled import TiledTower
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.presets import PRESETS
from vlmlab.training.stages import apply_stage

SMALL_CONVNEXT = {"hidden_sizes": [8, 12, 16, 20], "depths": [1, 1, 1, 1]}  # 56 channels on the stem's grid
SMALL_VIT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


def connector(d=8, c=12, out=10, **kw):
    torch.manual_seed(0)
    conn = MGMConnector([d, c], out, **kw)
    for p in conn.parameters():  # LayerNorms away from identity, so that every parameter matters
        torch.nn.init.normal_(p, std=0.5)
    return conn


def reference_mining(conn, low, high_map):
    """MGM's ``unified_resampler`` + residual, written from SYSTEMS.md §16: ``high_map`` ``[B, C, H, H]``."""
    n = int(low.shape[1] ** 0.5)
    m = high_map.shape[-1] // n
    b, c = high_map.shape[:2]
    win = (
        high_map.permute(0, 2, 3, 1)
        .reshape(b, n, m, n, m, c)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(b, n * n, m * m, c)
    )
    q = conn.query_projector(low)
    k = conn.aux_projector(win)
    v = conn.val_projector(win)
    att = (q[:, :, None] @ (k.transpose(-1, -2) / k.shape[-1] ** 0.5)).nan_to_num()
    return low + (att.softmax(-1) @ v).mean(2)


def as_tokens(high_map):
    return high_map.flatten(2).transpose(1, 2)


# -- patch info mining -----------------------------------------------------------------------------------------
def test_mining_is_the_reference_formula_then_the_projector():
    conn = connector()
    low, high = torch.randn(2, 16, 8), torch.randn(2, 12, 8, 8)  # 4 x 4 queries, 2 x 2 windows
    with torch.no_grad():
        mined = conn.mined([low, as_tokens(high)])
        torch.testing.assert_close(mined, reference_mining(conn, low, high), atol=1e-6, rtol=1e-6)
        assert torch.equal(conn([low, as_tokens(high)]), conn.projector(mined))
    assert conn.projector.layers[0].in_features == 8 and len(conn.projector.layers) == 3  # mlp2x_gelu
    names = {n.split(".")[0] for n, _ in conn.named_parameters()}
    assert names == {"query_projector", "aux_projector", "val_projector", "projector"}


def test_a_query_sees_only_its_own_window():
    """Invariant 1: HR features outside LR cell i's window leave token i's output exactly as it was."""
    conn = connector()
    low, high = torch.randn(1, 16, 8), torch.randn(1, 12, 8, 8)
    with torch.no_grad():
        base = conn([low, as_tokens(high)])
        changed = high.clone()
        changed[..., 4:, :] += 5 * torch.randn_like(changed[..., 4:, :])  # the HR rows of LR rows 2 and 3
        out = conn([low, as_tokens(changed)])
    assert torch.equal(out[:, :8], base[:, :8])  # LR rows 0, 1: untouched windows
    # Every token whose window changed moved.
    assert not torch.isclose(out[:, 8:], base[:, 8:]).all(dim=-1).any()
    one = high.clone()
    one[0, :, 2, 7] += 3 * torch.randn(12)  # one HR pixel: LR cell (1, 3) = token 7
    with torch.no_grad():
        out = conn([low, as_tokens(one)])
    moved = ~torch.isclose(out, base).all(dim=-1)[0]
    assert moved.nonzero().flatten().tolist() == [7]


def test_zero_value_projection_gives_the_low_resolution_tokens():
    """Invariant 2: ``vlm_uni_val_projector`` outputting 0 leaves X == X_L, whatever the HR map."""
    conn = connector()
    torch.nn.init.zeros_(conn.val_projector[1].weight)
    torch.nn.init.zeros_(conn.val_projector[1].bias)
    low = torch.randn(2, 16, 8)
    with torch.no_grad():
        for side in (4, 8):
            high = as_tokens(torch.randn(2, 12, side, side))
            assert torch.equal(conn.mined([low, high]), low)
            assert torch.equal(conn([low, high]), conn.projector(low))


def test_the_low_resolution_grid_fixes_the_output_count():
    """Invariant 3: one output row per LR token for any HR grid that is a multiple of the LR grid."""
    conn = connector()
    low = torch.randn(2, 16, 8)
    for side in (4, 8, 12, 32):
        assert conn([low, torch.randn(2, side * side, 12)]).shape == (2, 16, 10)
        assert conn.num_tokens([16, side * side]) == 16
    with pytest.raises(ConfigError, match="high-resolution grid 10 is not a multiple"):
        conn.num_tokens([16, 100])
    with pytest.raises(ConfigError, match="exactly two towers"):
        MGMConnector([8], 10)


def mgm_config(tokenizer, hr_side=64, vision=None, connector_params=None, image_size=None):
    return ModelConfig(
        vision=vision or VisionConfig(name="clip", image_size=32, params={**SMALL_VIT, "patch_size": 8}),
        extra_vision=[VisionConfig(name="convnext", image_size=hr_side, params=dict(SMALL_CONVNEXT))],
        connector=ConnectorConfig(name="mgm", params=connector_params or {}),
        language=LanguageConfig(model_type="llama", params=dict(LLAMA)),
        processor=ProcessorConfig(image_size=image_size or hr_side, max_length=128),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )


def test_models_with_any_high_resolution_keep_the_token_count_and_round_trip(tokenizer, tmp_path):
    counts = []
    for hr in (32, 64, 96):  # ConvNeXt maps of 8, 16 and 24 per side over 4 x 4 queries
        torch.manual_seed(0)
        model = VisionLanguageModel(mgm_config(tokenizer, hr)).eval()
        counts.append(model.num_image_tokens)
    assert counts == [16, 16, 16]
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        feats = model.tower_features(x)
        assert [tuple(f.shape) for f in feats] == [(2, 16, 16), (2, 576, 56)]
        out = model.encode_images(x)
    model.save_pretrained(tmp_path / "m")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_images(x), out)
    with pytest.raises(ConfigError, match="not a multiple"):
        VisionLanguageModel(mgm_config(tokenizer, 40))  # a 10 x 10 map over 4 x 4 queries


# -- MGM-HD ----------------------------------------------------------------------------------------------------
def test_hd_mines_each_tile_in_its_quadrant_and_the_whole_image_in_the_shrunk_map():
    hd = connector(image_grid=2, image_global=True)
    one = connector()  # the same weights (same seed), one view
    one.load_state_dict(hd.state_dict())
    low = torch.randn(2, 5 * 16, 8)  # 4 tiles (row-major), then the whole image, 4 x 4 tokens each
    high = torch.randn(2, 12, 16, 16)  # the HR map of the large image: 8 x 8 per quadrant
    with torch.no_grad():
        out = hd.mined([low, as_tokens(high)])
        assert out.shape == (2, 80, 8) and hd.num_tokens([80, 256]) == 80
        views = low.unflatten(1, (5, 16))
        whole = F.interpolate(high, size=(8, 8), mode="bilinear", align_corners=False)
        # The whole image first, then the tiles (computed in one batch here: equal up to rounding).
        torch.testing.assert_close(out[:, :16], one.mined([views[:, 4], as_tokens(whole)]), atol=1e-6, rtol=0)
        for t in range(4):
            i, j = divmod(t, 2)
            quadrant = high[..., 8 * i : 8 * i + 8, 8 * j : 8 * j + 8]
            torch.testing.assert_close(
                out[:, 16 * (t + 1) : 16 * (t + 2)],
                one.mined([views[:, t], as_tokens(quadrant)]),
                atol=1e-6,
                rtol=0,
            )
    with pytest.raises(ConfigError, match="image_global needs image_grid > 1"):
        MGMConnector([8, 12], 10, image_global=True)


def test_the_tiled_tower_runs_its_tower_on_the_tiles_then_the_whole_image():
    torch.manual_seed(0)
    cfg = VisionConfig(
        name="tiled", image_size=64, params={"tower": "clip", "grid": 2, **SMALL_VIT, "patch_size": 8}
    )
    tower = TiledTower(cfg).eval()
    assert (tower.tower.num_tokens, tower.num_tokens, tower.hidden_size) == (16, 80, 16)
    x = torch.randn(2, 3, 64, 64)
    views = tower.views_of(x).unflatten(0, (2, 5))
    assert torch.equal(views[:, 1], x[..., :32, 32:]) and torch.equal(views[:, 2], x[..., 32:, :32])
    assert torch.equal(views[:, 4], F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False))
    with torch.no_grad():
        assert torch.equal(
            tower(x).unflatten(1, (5, 16)), tower.tower(views.flatten(0, 1)).unflatten(0, (2, 5))
        )
    params = tower.architecture_params()
    assert params["tower"] == "clip" and params["grid"] == 2 and params["hidden_size"] == 16
    rebuilt = TiledTower(VisionConfig(name="tiled", image_size=64, params=params))
    rebuilt.load_state_dict(tower.state_dict())


def test_a_tiny_hd_model_gives_five_views_of_tokens(tokenizer):
    torch.manual_seed(0)
    lr = VisionConfig(
        name="tiled", image_size=64, params={"tower": "clip", "grid": 2, **SMALL_VIT, "patch_size": 8}
    )
    config = mgm_config(tokenizer, 128, vision=lr, connector_params={"image_grid": 2, "image_global": True})
    model = VisionLanguageModel(config).eval()
    assert model.num_image_tokens == 80  # 5 views of 4 x 4; the HR map is 32 x 32
    with torch.no_grad():
        assert model.encode_images(torch.randn(1, 3, 128, 128)).shape == (1, 80, LLAMA["hidden_size"])


# -- the ConvNeXt tower ----------------------------------------------------------------------------------------
def test_convnext_tower_is_every_transformers_stage_on_the_stem_grid():
    torch.manual_seed(0)
    tower = ConvNextTower(VisionConfig(name="convnext", image_size=64, params=dict(SMALL_CONVNEXT))).eval()
    assert (tower.hidden_size, tower.num_tokens) == (56, 256)
    hf = ConvNextModel(ConvNextConfig(image_size=64, **SMALL_CONVNEXT)).eval()
    hf.load_state_dict(tower.model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stages = hf(x, output_hidden_states=True).hidden_states[1:]  # after the stem: stage 0..3
        want = torch.cat(
            [
                stages[0],
                *(F.interpolate(s, size=(16, 16), mode="bilinear", align_corners=False) for s in stages[1:]),
            ],
            dim=1,
        )
        assert torch.equal(tower(x), want.flatten(2).transpose(1, 2))
    rebuilt = ConvNextTower(VisionConfig(name="convnext", image_size=64, params=tower.architecture_params()))
    rebuilt.load_state_dict(tower.state_dict())


# -- the <h> image prompt ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Here it is. <h>a red fox in snow</h>", ("Here it is.", "a red fox in snow")),
        ("<h>one</h> and <h>two</h> done", ("<h>one</h> and  done", "two")),  # the last complete block
        ("a<h>b</h>c</h>", ("ac</h>", "b")),  # a stray close tag is not a block
        ("<h>x<h>y</h>", ("<h>x", "y")),
        ("no block here", ("no block here", None)),
        ("unclosed <h>a cat", ("unclosed <h>a cat", None)),
        ("</h> backwards <h>", ("</h> backwards <h>", None)),
    ],
)
def test_image_prompt_parsing(text, want):
    assert split_image_prompt(text) == want


def test_answer_hands_the_prompt_to_the_generator_and_returns_the_text(tokenizer):
    model, proc = make_model(tokenizer)
    scripted = "two shapes <h>a red circle</h>"
    ids = tokenizer.encode(scripted, add_special_tokens=False)
    assert tokenizer.decode(ids) == scripted
    model.generate = lambda **kw: torch.tensor([ids])
    prompts = []
    reply = answer(
        model, proc, "Draw it <GEN>", images=[Image.new("RGB", (32, 32))], image_generator=prompts.append
    )
    assert (reply, prompts) == ("two shapes", ["a red circle"])
    assert (
        answer(model, proc, "Draw it", images=[Image.new("RGB", (32, 32))]) == "two shapes"
    )  # default: dropped


def test_the_server_returns_and_hands_over_the_image_prompt(tokenizer, monkeypatch):
    from vlmlab.serving import engine as engine_module

    served = make_model(tokenizer, max_length=128)
    ids = tokenizer.encode("a circle <h>a red circle</h>", add_special_tokens=False) + [LLAMA["eos_token_id"]]
    script = iter(ids * 2)
    monkeypatch.setattr(engine_module, "sample_next", lambda *a, **k: torch.tensor([next(script)]))
    prompts = []
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL_NAME, "messages": [image_message()], "max_tokens": 60}
    with running_server(make_app(served, image_generator=prompts.append)) as url:
        message = httpx.post(url + "/v1/chat/completions", headers=headers, json=body).json()["choices"][0][
            "message"
        ]
        with httpx.stream(
            "POST", url + "/v1/chat/completions", headers=headers, json={**body, "stream": True}
        ) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert message["content"] == "a circle" and message["image_prompt"] == "a red circle"
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "stop" and last["delta"]["image_prompt"] == "a red circle"
    assert prompts == ["a red circle", "a red circle"]


# -- presets ---------------------------------------------------------------------------------------------------
MGM_SCALE = {"mini-gemini": (576, 768, 36864), "mini-gemini-hd": (2880, 1536, 147456)}


def mining_params(d, c, d_lm):
    norm_linear = lambda i, o: 2 * i + i * o + o  # noqa: E731
    return norm_linear(d, d) + 2 * norm_linear(c, d) + d * d_lm + d_lm + d_lm * d_lm + d_lm


@pytest.mark.parametrize("name", sorted(MGM_SCALE))
def test_real_scale_presets_have_the_papers_numbers(name):
    preset = PRESETS[name]()
    with torch.device("meta"):
        model = VisionLanguageModel(preset.config, load_pretrained=False)
    tokens, hr_side, hr_tokens = MGM_SCALE[name]
    assert model.num_image_tokens == tokens and preset.config.processor.image_size == hr_side
    assert (model.extra_vision[0].hidden_size, model.extra_vision[0].num_tokens) == (2880, hr_tokens)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 196.2e6 < count(model.extra_vision) < 196.3e6  # ConvNeXt-L without its head
    assert 303.4e6 < count(model.vision) < 303.6e6  # CLIP ViT-L/14-336
    assert 6.7e9 < count(model.language) < 6.8e9  # Vicuna-7B
    with torch.no_grad():  # the whole image path at real scale, shapes only
        x = torch.empty(1, 3, hr_side, hr_side, device="meta")
        assert model.encode_images(x).shape == (1, tokens, 4096)
    first = apply_stage(model, preset.recipe[0])
    trainable = sum(p.numel() for g in first for p in g["params"])
    if name == "mini-gemini":  # stage 1: the connector alone (the mining projections and the projector)
        assert trainable == mining_params(1024, 2880, 4096)
        assert [s.train for s in preset.recipe] == [("connector",), ("connector", "language")]
        assert [s.lr for s in preset.recipe] == [{"connector": 1e-3}, {"connector": 2e-5, "language": 2e-5}]
    else:  # MGM-HD: stage 2 only, from MGM-7B's connector
        assert [s.train for s in preset.recipe] == [("connector", "language")]


def test_inspect_works_on_the_meta_device():
    from vlmlab.summary import summarize

    s = summarize("mini-gemini", [(768, 1024)])
    assert s["parts"]["connector"] == {"name": "mgm", "params": mining_params(1024, 2880, 4096)}
    assert s["visual_tokens"] == {"768x1024": 576}


def test_the_tiny_preset_runs_and_its_recipe_follows_mgms():
    model, proc = vlmlab.build("mini-gemini-tiny")
    assert model.num_image_tokens == 16 and model.extra_vision[0].num_tokens == 256
    conv = [
        {"role": "user", "content": "<image>\nWhich way do the stripes on the small disc run?"},
        {"role": "assistant", "content": "horizontal"},
    ]
    batch = proc.collate([proc.encode(conv, [Image.new("RGB", (128, 96), "red")], train=True)])
    assert batch["pixel_values"].shape[-1] == 64
    recipe = PRESETS["mini-gemini-tiny"]().recipe
    # MGM's stages; the random tiny LLM trains in stage 1 and the towers in stage 2 (MGM's stay frozen).
    assert [s.train for s in recipe] == [("connector", "language"), ("vision", "connector", "language")]
    apply_stage(model, recipe[0])
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # Stage 1 reaches every connector parameter (the mining projections through the attention) and the LLM only.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connector.parameters())
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None} == {
        "connector",
        "language",
    }
