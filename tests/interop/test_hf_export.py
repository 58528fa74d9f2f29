"""``vlmlab.save(model, processor, path, format="hf")`` writes what transformers (and the serving engines built on
it) load as they are: the model type's config and weights, the tokenizer with its chat template and the
processor's files. Loaded back with ``AutoProcessor`` and transformers' own model class, they must make vlmlab's
``input_ids`` and ``pixel_values`` and its logits; ``vlmlab.load`` of the export gives back the same processor."""

import dataclasses
import json

import pytest
import torch
from tests.interop.test_hf_llava_next import PINPOINTS, conversations, hf_model, images, tok  # noqa: F401
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

import vlmlab
from vlmlab.errors import CheckpointError, ConfigError
from vlmlab.processing.processor import Processor

LLAVA_SETTINGS = {  # vlmlab processor settings -> each must reach transformers' processor unchanged
    "clip": {},  # imported from a CLIPImageProcessor: shortest edge + centre crop
    "llava-1.5": {"pad_to_square": True, "resize": "squash", "image_mean": (0.48, 0.46, 0.41)},
    "squash": {"resize": "squash", "image_std": (0.5, 0.5, 0.5)},
}


def llava_checkpoint(tok, tmp_path):  # noqa: F811
    """A tiny random llava (transformers' class, CLIP tower at 32 px, patch 8) with ``tok``."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig

    torch.manual_seed(0)
    tower = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(num_hidden_layers=3, **tower),
        text_config=LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **text),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
    )
    path = tmp_path / "llava"
    LlavaForConditionalGeneration(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    tok.save_pretrained(path)
    return path


def exported_matches(model, processor, out, model_cls, n_images):
    """transformers' processor and model loaded from ``out`` against vlmlab's on the same conversations."""
    hf_proc = AutoProcessor.from_pretrained(out)
    hf = model_cls.from_pretrained(out, dtype=torch.float32).eval()
    convs = conversations(n_images)
    ims = images()[: sum(n_images)]
    per_prompt, k = [], 0
    for n in n_images:
        per_prompt.append(ims[k : k + n])
        k += n
    ours = processor(convs, per_prompt)
    texts = [hf_proc.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    ref = hf_proc(images=ims, text=texts, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        if key in ref:
            assert torch.equal(ours[key], ref[key]), key
    inputs = {k: v for k, v in ours.items() if k != "labels"}
    with torch.no_grad():
        mask = ref["attention_mask"].bool()
        torch.testing.assert_close(
            model(**inputs).logits[mask], hf(**{k: ref[k] for k in inputs}).logits[mask], atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("setting", sorted(LLAVA_SETTINGS))
def test_llava_export_is_a_complete_transformers_directory(tok, tmp_path, setting):  # noqa: F811
    model, processor = vlmlab.load(llava_checkpoint(tok, tmp_path))
    cfg = dataclasses.replace(model.config.processor, **LLAVA_SETTINGS[setting])
    model.config.processor = cfg
    processor = Processor(processor.tokenizer, cfg, model.num_image_tokens)
    files = vlmlab.save(model.eval(), processor, tmp_path / "out", format="hf")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"):
        assert name in files
    exported_matches(model, processor, tmp_path / "out", LlavaForConditionalGeneration, [2, 1])
    back, back_proc = vlmlab.load(tmp_path / "out")
    assert back_proc.config == processor.config
    assert back.config.processor == cfg


def test_llava_next_export_is_a_complete_transformers_directory(tok, tmp_path):  # noqa: F811
    _, path = hf_model("llava_next", tok, tmp_path)
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    tok.save_pretrained(path)
    model, processor = vlmlab.load(path)
    model.eval()
    vlmlab.save(model, processor, tmp_path / "out", format="hf")
    exported_matches(model, processor, tmp_path / "out", LlavaNextForConditionalGeneration, [1, 1, 1])
    back, back_proc = vlmlab.load(tmp_path / "out")
    assert back_proc.config.anyres.grid_pinpoints == PINPOINTS
    assert back_proc.config == processor.config


def test_save_is_atomic_and_refuses_what_is_not_a_model_directory(tok, tmp_path):  # noqa: F811
    model, processor = vlmlab.load(llava_checkpoint(tok, tmp_path))
    out = tmp_path / "out"
    vlmlab.save(model, processor, out, format="hf")
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    class Boom(RuntimeError):
        pass

    def fail(*a, **k):
        raise Boom("disk full")

    processor.tokenizer.save_pretrained, saved = fail, processor.tokenizer.save_pretrained
    with pytest.raises(Boom):  # a failure half way leaves the previous export as it was, and no temp folder
        vlmlab.save(model, processor, out, format="vlmlab")
    processor.tokenizer.save_pretrained = saved
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["llava", "out"])
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes: refusing to overwrite"):
        vlmlab.save(model, processor, other)
    with pytest.raises(ConfigError, match="format 'onnx'"):
        vlmlab.save(model, processor, tmp_path / "x", format="onnx")
    # A composition transformers has no class for is named before anything is written.
    tiny, tiny_proc = vlmlab.build("tiny")
    with pytest.raises(ConfigError, match="needs a clip or siglip tower .* not 'convnet'"):
        vlmlab.save(tiny, tiny_proc, tmp_path / "tiny-hf", format="hf")
    assert not any(p.name.startswith("tiny-hf") for p in tmp_path.iterdir())


def test_export_command_converts_a_transformers_directory_and_back(tok, tmp_path, capsys):  # noqa: F811
    from vlmlab.cli import main

    src = llava_checkpoint(tok, tmp_path)
    assert main(["export", str(src), str(tmp_path / "mine"), "--format", "vlmlab"]) == 0
    assert main(["export", str(tmp_path / "mine"), str(tmp_path / "hf")]) == 0
    assert "preprocessor_config.json" in capsys.readouterr().out
    model, processor = vlmlab.load(tmp_path / "mine")
    exported_matches(model.eval(), processor, tmp_path / "hf", LlavaForConditionalGeneration, [1, 2])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert main(["export", str(src), str(tmp_path / "notes")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vlmlab: error:") and "refusing to overwrite" in err and "\n" not in err


def tokenizer_without_image_token():
    """A BPE tokenizer like the tests' own, without ``<image>``: the original LLaVA repository's situation."""
    from tests.conftest import TEXTS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vlmlab.processing.tokenizer import CHAT_TEMPLATES, EOS, PAD, SPECIAL_TOKENS

    specials = [t for t in SPECIAL_TOKENS if t != "<image>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(TEXTS, trainer)
    out = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=PAD, eos_token=EOS, additional_special_tokens=specials[2:]
    )
    out.chat_template = CHAT_TEMPLATES["tiny"]
    return out


def test_an_original_llava_checkpoint_converts_to_a_transformers_directory(tmp_path):
    """The original repository's layout (images as id -200, no ``<image>`` in its tokenizer) loads with its
    processor working, and ``vlmlab export`` writes what transformers' conversion script would: ``<image>``
    appended to the tokenizer, the vocabulary grown by its row (at the mean), logits of every other token
    unchanged; transformers' processor and model loaded from the export then reproduce vlmlab's inputs and logits."""
    from tests.interop.test_original_llava import ORIGINAL, write_original_layout
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from vlmlab.cli import main

    plain = tokenizer_without_image_token()
    assert plain.convert_tokens_to_ids("<image>") in (None, plain.unk_token_id)
    v0 = len(plain)
    torch.manual_seed(0)
    tower = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    # transformers' conversion of the checkpoint: <image> appended at id v0.
    hf = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=CLIPVisionConfig(num_hidden_layers=3, **tower),
            text_config=LlamaConfig(vocab_size=v0 + 1, pad_token_id=plain.pad_token_id, **text),
            image_token_index=v0,
            image_seq_length=16,
        )
    ).eval()
    path = write_original_layout(hf, tmp_path)  # then the original's own vocabulary: without that row
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][:v0].clone()
    save_file(state, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["vocab_size"] = v0
    (path / "config.json").write_text(json.dumps(cfg))
    plain.save_pretrained(path)

    assert vlmlab.from_pretrained(path).config.image_token_id == ORIGINAL
    model, processor = vlmlab.load(path)
    model.eval()
    assert model.config.image_token_id == v0 == processor.image_token_id
    assert model.language.get_input_embeddings().num_embeddings == v0 + 1
    convs = conversations([2, 1])
    ims = images()[:3]
    batch = processor(convs, [ims[:2], ims[2:]])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ours, ref = model(**inputs).logits, hf(**inputs).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[mask][:, :v0], ref[mask][:, :v0], atol=1e-4, rtol=1e-4)
    # The new row is the mean of the old: the placeholder's logit is their mean, never the greedy choice.
    torch.testing.assert_close(ours[mask][:, v0], ours[mask][:, :v0].mean(-1), atol=1e-4, rtol=1e-4)

    assert main(["export", str(path), str(tmp_path / "hf")]) == 0
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["image_token_index"] == v0 and exported["text_config"]["vocab_size"] == v0 + 1
    exported_matches(model, processor, tmp_path / "hf", LlavaForConditionalGeneration, [2, 1])
