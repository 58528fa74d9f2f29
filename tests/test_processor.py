"""Tests of ``vlmlab.processing.processor.Processor``: label masking, image-token expansion, sample errors,
truncation, padding, and train/serve parity (RELIABILITY.md D5).

Expected token ids and labels are computed independently of the processor: each piece of the known chat
template (``<|user|>...<|end|><|assistant|>REPLY<|end|>`` of ``processing/tokenizer.py``, and a ChatML template
written out here) is tokenized on its own and tagged supervised or not by hand. Train/serve parity compares the
``SupervisedDataset`` tensors (images read from disk) with the inference call ``processor(conversations, images)``
with ``torch.equal`` on random images of random sizes and Pillow modes.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TEXTS
from vlmlab.config import ProcessorConfig
from vlmlab.data.dataset import SupervisedDataset
from vlmlab.data.formats import Record
from vlmlab.errors import SampleError
from vlmlab.processing.processor import IGNORE_INDEX, Processor
from vlmlab.processing.tokenizer import train_bpe_tokenizer

N_IMG = 16  # visual tokens per image for the processors built directly here

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_processor(tokenizer, max_length: int = 512, **cfg) -> Processor:
    return Processor(tokenizer, ProcessorConfig(image_size=32, max_length=max_length, **cfg), N_IMG)


def expected(tokenizer, pieces: list[tuple[str, bool]], n_img: int = N_IMG) -> tuple[list[int], list[int]]:
    """Ids and labels from template pieces tokenized one by one; ``<image>`` expands to ``n_img`` ids."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids: list[int] = []
    labels: list[int] = []
    for text, supervised in pieces:
        if text == "<image>":
            ids += [image_id] * n_img
            labels += [IGNORE_INDEX] * n_img
            continue
        toks = tokenizer.encode(text, add_special_tokens=False)
        assert toks, text
        ids += toks
        labels += toks if supervised else [IGNORE_INDEX] * len(toks)
    return ids, labels


TWO_TURNS = [
    {"role": "user", "content": "<image>\nWhat color is the shape?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "What shape is this?"},
    {"role": "assistant", "content": "a large red circle"},
]


def test_two_turn_labels_mask_everything_but_replies_and_their_end_tokens(tokenizer):
    proc = make_processor(tokenizer)
    out = proc.encode(TWO_TURNS, [Image.new("RGB", (20, 10), (255, 0, 0))], train=True)
    ids, labels = expected(
        tokenizer,
        [
            ("<|user|>", False),
            ("<image>", False),
            ("\nWhat color is the shape?", False),
            ("<|end|>", False),
            ("<|assistant|>", False),
            ("red", True),
            ("<|end|>", True),
            ("<|user|>", False),
            ("What shape is this?", False),
            ("<|end|>", False),
            ("<|assistant|>", False),
            ("a large red circle", True),
            ("<|end|>", True),
        ],
    )
    assert out["input_ids"].tolist() == ids
    assert out["labels"].tolist() == labels
    # Exactly num_image_tokens image positions, all unsupervised, contiguous where the placeholder was.
    image_pos = (out["input_ids"] == proc.image_token_id).nonzero().flatten().tolist()
    assert len(image_pos) == N_IMG
    assert image_pos == list(range(image_pos[0], image_pos[0] + N_IMG))
    assert all(out["labels"][p] == IGNORE_INDEX for p in image_pos)
    # Supervised tokens decode to the two replies, each followed by its end token.
    sup = [t for t in out["labels"].tolist() if t != IGNORE_INDEX]
    assert tokenizer.decode(sup) == "red<|end|>a large red circle<|end|>"
    assert out["pixel_values"].shape == (1, 3, 32, 32)


def test_image_tokens_per_image_with_two_images(tokenizer):
    proc = make_processor(tokenizer)
    msgs = [
        {"role": "user", "content": "<image> and <image>: same color?"},
        {"role": "assistant", "content": "red"},
    ]
    imgs = [Image.new("RGB", (8, 8)), Image.new("RGB", (9, 5))]
    out = proc.encode(msgs, imgs, train=True)
    assert int((out["input_ids"] == proc.image_token_id).sum()) == 2 * N_IMG
    assert out["pixel_values"].shape == (2, 3, 32, 32)


def test_model_and_processor_agree_on_image_token_count(tiny_model):
    model, proc = tiny_model
    out = proc.encode(TWO_TURNS, [Image.new("RGB", (40, 40))], train=True)
    n = int((out["input_ids"] == proc.image_token_id).sum())
    assert n == model.num_image_tokens == proc.num_image_tokens
    feats = model.encode_images(out["pixel_values"])
    assert feats.shape[1] == n


@pytest.fixture(scope="module")
def chatml_tokenizer():
    tok = train_bpe_tokenizer(TEXTS, vocab_size=320)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML_TEMPLATE
    return tok


def test_chatml_template_trailing_newline_is_not_supervised(chatml_tokenizer):
    tok = chatml_tokenizer
    proc = make_processor(tok)
    out = proc.encode(TWO_TURNS, [Image.new("RGB", (8, 8))], train=True)
    ids, labels = expected(
        tok,
        [
            ("<|im_start|>", False),
            ("user\n", False),
            ("<image>", False),
            ("\nWhat color is the shape?", False),
            ("<|im_end|>", False),
            ("\n", False),
            ("<|im_start|>", False),
            ("assistant\n", False),
            ("red", True),
            ("<|im_end|>", True),
            ("\n", False),
            ("<|im_start|>", False),
            ("user\nWhat shape is this?", False),
            ("<|im_end|>", False),
            ("\n", False),
            ("<|im_start|>", False),
            ("assistant\n", False),
            ("a large red circle", True),
            ("<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert out["input_ids"].tolist() == ids
    assert out["labels"].tolist() == labels
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    newline = tok.encode("\n", add_special_tokens=False)
    assert len(newline) == 1
    # The last token is the template's "\n" (unsupervised); the one before is the reply's <|im_end|> (supervised).
    assert out["input_ids"][-1] == newline[0] and out["labels"][-1] == IGNORE_INDEX
    assert out["input_ids"][-2] == im_end and out["labels"][-2] == im_end
    # The generation prompt is the training sample's prefix up to the reply.
    prompt = proc.encode(TWO_TURNS[:1], [Image.new("RGB", (8, 8))], add_generation_prompt=True)["input_ids"]
    first_sup = next(i for i, lab in enumerate(out["labels"].tolist()) if lab != IGNORE_INDEX)
    assert prompt.tolist() == out["input_ids"][:first_sup].tolist()


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_more_placeholders_than_images_raises_naming_both_counts(tokenizer):
    proc = make_processor(tokenizer)
    msgs = [{"role": "user", "content": "<image><image> compare"}, {"role": "assistant", "content": "red"}]
    with pytest.raises(SampleError) as ei:
        proc.encode(msgs, [Image.new("RGB", (4, 4))])
    msg = _one_line_error(ei)
    assert "2 <image> placeholder" in msg and "1 image" in msg


def test_fewer_placeholders_than_images_raises_naming_both_counts(tokenizer):
    proc = make_processor(tokenizer)
    msgs = [{"role": "user", "content": "<image> compare"}, {"role": "assistant", "content": "red"}]
    with pytest.raises(SampleError) as ei:
        proc.encode(msgs, [Image.new("RGB", (4, 4))] * 3)
    msg = _one_line_error(ei)
    assert "1 <image> placeholder" in msg and "3 image" in msg


def test_literal_placeholder_without_image_raises(tokenizer):
    proc = make_processor(tokenizer)
    msgs = [
        {"role": "user", "content": "what does the tag <image> mean in html?"},
        {"role": "assistant", "content": "red"},
    ]
    with pytest.raises(SampleError) as ei:
        proc.encode(msgs, [])
    msg = _one_line_error(ei)
    assert "1 <image> placeholder" in msg and "0 image" in msg
    # Also on the inference path.
    with pytest.raises(SampleError):
        proc([msgs[:1]], [[]])


LONG = " ".join(["red green blue yellow"] * 20)


def test_truncation_refuses_to_cut_through_an_image(tokenizer):
    proc = make_processor(tokenizer, max_length=30)
    head = len(tokenizer.encode("<|user|>" + LONG, add_special_tokens=False))
    assert head > 30  # the image lies wholly beyond the cut
    beyond = [{"role": "user", "content": LONG + "<image>"}, {"role": "assistant", "content": "red"}]
    with pytest.raises(SampleError, match="cut through an image") as ei:
        proc.encode(beyond, [Image.new("RGB", (4, 4))], train=True)
    _one_line_error(ei)
    # The image straddles the cut: a few text tokens before it, 16 image tokens, cut at 12.
    proc12 = make_processor(tokenizer, max_length=12)
    through = [{"role": "user", "content": "red green<image>"}, {"role": "assistant", "content": "red"}]
    before = len(tokenizer.encode("<|user|>red green", add_special_tokens=False))  # text ahead of the image
    assert before < 12 < before + N_IMG
    with pytest.raises(SampleError, match="cut through an image"):
        proc12.encode(through, [Image.new("RGB", (4, 4))])
    # Boundary: a cut right after the image's last token keeps the image whole and is allowed.
    exact = make_processor(tokenizer, max_length=before + N_IMG)
    out = exact.encode(through, [Image.new("RGB", (4, 4))])
    assert len(out["input_ids"]) == before + N_IMG
    assert out["input_ids"][-N_IMG:].tolist() == [exact.image_token_id] * N_IMG


def test_text_only_overflow_is_truncated_to_max_length(tokenizer):
    proc = make_processor(tokenizer, max_length=30)
    msgs = [{"role": "user", "content": "color?"}, {"role": "assistant", "content": LONG}]
    full = make_processor(tokenizer).encode(msgs, [], train=True)
    out = proc.encode(msgs, [], train=True)
    assert len(full["input_ids"]) > 30
    assert out["input_ids"].tolist() == full["input_ids"][:30].tolist()
    assert out["labels"].tolist() == full["labels"][:30].tolist()
    # An image before the cut survives whole while the reply is cut.
    proc40 = make_processor(tokenizer, max_length=40)
    with_image = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": LONG}]
    out = proc40.encode(with_image, [Image.new("RGB", (4, 4))], train=True)
    assert len(out["input_ids"]) == 40
    assert int((out["input_ids"] == proc40.image_token_id).sum()) == N_IMG


def test_training_sample_with_every_label_masked_is_rejected(tokenizer):
    proc = make_processor(tokenizer, max_length=30)
    # The reply starts after the cut: nothing is left to supervise.
    msgs = [{"role": "user", "content": LONG}, {"role": "assistant", "content": "red"}]
    with pytest.raises(SampleError, match="no supervised tokens") as ei:
        proc.encode(msgs, [], train=True)
    _one_line_error(ei)
    # A conversation without assistant turn is rejected for training too, but fine as a prompt.
    with pytest.raises(SampleError, match="no supervised tokens"):
        make_processor(tokenizer).encode(msgs[:1], [], train=True)
    assert make_processor(tokenizer).encode(msgs[:1], [], add_generation_prompt=True)["input_ids"].numel() > 0


def _random_image(rng: random.Random, nprng: np.random.Generator) -> tuple[Image.Image, str]:
    w, h = rng.randint(1, 200), rng.randint(1, 200)
    mode = rng.choice(["RGB", "RGBA", "L", "P", "CMYK"])
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1, "CMYK": 4}[mode]
    arr = nprng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    if mode in ("L", "P"):
        img = Image.fromarray(arr[:, :, 0], mode="L")
        if mode == "P":
            img = img.convert("RGB").quantize(colors=rng.randint(2, 64))
    else:
        img = Image.fromarray(arr, mode=mode)
    ext = {
        "RGB": rng.choice(["png", "jpg", "bmp"]),
        "RGBA": rng.choice(["png", "webp"]),
        "L": "png",
        "P": rng.choice(["png", "gif"]),
        "CMYK": "jpg",
    }[mode]
    return img, ext


@pytest.mark.parametrize("pad_to_square", [False, True])
def test_training_and_inference_preprocessing_are_identical(tokenizer, tmp_path, pad_to_square):
    """RELIABILITY D5: random sizes (1..200 px) and modes, from files on disk, through both paths."""
    proc = make_processor(tokenizer, pad_to_square=pad_to_square)
    rng, nprng = random.Random(pad_to_square), np.random.default_rng(int(pad_to_square))
    questions = ["What color is the shape?", "What shape is this?", "How many shapes are there?"]
    records = []
    for i in range(250):  # 500 images over both settings, as RELIABILITY D5 asks
        img, ext = _random_image(rng, nprng)
        path = tmp_path / f"img{i}.{ext}"
        img.save(path)
        msgs = [
            {"role": "user", "content": f"<image>\n{rng.choice(questions)}"},
            {"role": "assistant", "content": rng.choice(["red", "circle", "two"])},
        ]
        records.append(Record(id=f"r{i}", images=[str(path)], messages=msgs))
    dataset = SupervisedDataset(records, proc)
    for i, rec in enumerate(records):
        train = dataset[i]
        serve = proc([rec.messages[:1]], [rec.images])
        served_bytes = proc([rec.messages[:1]], [[Path(rec.images[0]).read_bytes()]])
        assert train["pixel_values"].shape == (1, 3, 32, 32)
        assert torch.equal(train["pixel_values"], serve["pixel_values"]), rec.images[0]
        assert torch.equal(train["pixel_values"], served_bytes["pixel_values"]), rec.images[0]
        first_sup = next(j for j, lab in enumerate(train["labels"].tolist()) if lab != IGNORE_INDEX)
        assert serve["input_ids"][0].tolist() == train["input_ids"][:first_sup].tolist()
        assert serve["attention_mask"].bool().all()
    # Two calls of the training path give the same tensors too (no hidden state between uses).
    assert torch.equal(dataset[0]["pixel_values"], dataset[0]["pixel_values"])


def test_collate_pads_right_for_training_and_left_for_generation(tokenizer):
    proc = make_processor(tokenizer)
    short = proc.encode(
        [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "red"}],
        [Image.new("RGB", (4, 4), (255, 0, 0))],
        train=True,
    )
    long = proc.encode(TWO_TURNS, [Image.new("RGB", (6, 3), (0, 0, 255))], train=True)
    n_s, n_l = len(short["input_ids"]), len(long["input_ids"])
    assert n_s < n_l
    pad = proc.pad_token_id
    assert pad == tokenizer.pad_token_id

    right = proc.collate([short, long])
    assert right["input_ids"].shape == right["labels"].shape == right["attention_mask"].shape == (2, n_l)
    assert right["input_ids"][0, :n_s].tolist() == short["input_ids"].tolist()
    assert (right["input_ids"][0, n_s:] == pad).all()
    assert right["labels"][0, :n_s].tolist() == short["labels"].tolist()
    assert (right["labels"][0, n_s:] == IGNORE_INDEX).all()
    assert right["attention_mask"][0].tolist() == [1] * n_s + [0] * (n_l - n_s)
    assert right["attention_mask"][1].tolist() == [1] * n_l
    assert right["input_ids"][1].tolist() == long["input_ids"].tolist()
    # Images are concatenated in sample order.
    assert torch.equal(right["pixel_values"], torch.cat([short["pixel_values"], long["pixel_values"]]))

    left = proc.collate([short, long], padding_side="left")
    assert left["input_ids"][0, n_l - n_s :].tolist() == short["input_ids"].tolist()
    assert (left["input_ids"][0, : n_l - n_s] == pad).all()
    assert (left["labels"][0, : n_l - n_s] == IGNORE_INDEX).all()
    assert left["attention_mask"][0].tolist() == [0] * (n_l - n_s) + [1] * n_s

    # The inference call left-pads, and each row ends with the generation prompt.
    batch = proc(
        [[{"role": "user", "content": "<image>"}], TWO_TURNS[:3]],
        [[Image.new("RGB", (4, 4))], [Image.new("RGB", (4, 4))]],
    )
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert (batch["input_ids"][:, -1] == assistant).all()
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]
    assert batch["attention_mask"][0, 0] == 0 and batch["input_ids"][0, 0] == pad
    # Text-only batches have no pixel_values.
    assert proc.collate([proc.encode([{"role": "user", "content": "hi"}], [])])["pixel_values"] is None
