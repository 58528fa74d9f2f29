"""``vlmlab inspect``: parts and parameter counts (real-scale presets built on the meta device), trainable
parameters per stage, and visual tokens per image size equal to what the processor expands."""

import json

import pytest
from PIL import Image

from vlmlab.api import build
from vlmlab.cli import main
from vlmlab.summary import summarize

# Known sizes: CLIP ViT-L/14 at 336 px (transformers' CLIPVisionModel), LLaVA-1.5's projector
# (1024*4096 + 4096 + 4096*4096 + 4096) and Vicuna-7B (Llama-2-7B).
CLIP_L14_336 = 303_507_456
MLP2X_1024_4096 = 20_979_712
LLAMA2_7B = 6_738_415_616


def test_real_scale_counts_without_weights():
    s = summarize("llava-1.5", [])
    assert s["parts"]["vision"]["params"] == CLIP_L14_336
    assert s["parts"]["connector"]["params"] == MLP2X_1024_4096
    assert s["parts"]["language"]["params"] == LLAMA2_7B
    assert s["total_params"] == CLIP_L14_336 + MLP2X_1024_4096 + LLAMA2_7B
    align, instruct = s["stages"]
    assert align["train"] == ["connector"] and align["trainable_params"] == MLP2X_1024_4096
    assert instruct["trainable_params"] == MLP2X_1024_4096 + LLAMA2_7B
    assert s["visual_tokens"] == {"336x336": 576}


@pytest.mark.parametrize("preset", ["llava-next-tiny", "tiny"])
def test_visual_tokens_match_the_processor(preset):
    sizes = [(800, 1300), (64, 64), (37, 211)]
    s = summarize(preset, sizes)
    _, processor = build(preset)
    for h, w in sizes:
        expected = processor.image_token_counts([Image.new("RGB", (w, h))])[0]
        assert s["visual_tokens"][f"{h}x{w}"] == expected


def test_cli_text_and_json(capsys):
    assert main(["inspect", "llava-next", "--image-size", "800x1300"]) == 0
    out = capsys.readouterr().out
    assert "6.74B" in out and "800x1300: 2046" in out and "instruct" in out
    assert main(["inspect", "tiny", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["visual_tokens"] == {"64x64": 16}
    assert [st["name"] for st in s["stages"]] == ["align", "pretrain", "instruct"]


def test_cli_bad_input(capsys):
    assert main(["inspect", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'no-such-preset'" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["inspect", "tiny", "--image-size", "12xabc"])
    assert "HEIGHTxWIDTH" in capsys.readouterr().err
