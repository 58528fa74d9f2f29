"""High-resolution tilers: an image -> several fixed-size views whose features follow each other.

[Contract] A tiler is built as ``TILERS[name](**params)`` and has ``views(image, side) -> list[PIL.Image]`` (each
``side`` x ``side``, in the order their features are spliced) and ``num_views((height, width), side) -> int``
(the same count without the pixels, so the processor and the model always agree). It may define
``token_ids(size, side, tokens_per_view, image_token_id, tokenizer) -> list[int]`` for a layout with text between
views (e.g. row and column markers), and ``num_tokens(size, side, tokens_per_view) -> int`` when an image is not
``num_views * tokens_per_view`` placeholders.
A *packing* tiler also defines ``packer(dim, side) -> nn.Module`` for layouts with learned vectors between or
inside its views: the model holds that module (``VisionLanguageModel.packer``, trained as the ``newline`` part)
and calls it per image on the views' tower features, ``packer(feats [P, N_vis, dim], (height, width)) ->
[num_tokens, packer.out_dim]``; the connector then maps those rows one to one (so it must keep rows, e.g. an
MLP), and the processor gives ``image_sizes`` ``[N_img, 2]`` with the views ``[sum P, 3, side, side]``
(XComposer2-4KHD's ``hd``: 2 x 2 merge, a learned separator after every row and between global and local views).
Add one: a file in this folder and one line below. LLaVA-NeXT AnyRes (``anyres.py``) packs its tiles' features
into one map with newlines and unpadding, so it has its own settings (``ProcessorConfig.anyres``).
"""

from vlmlab.models.tiling.fuyu import FuyuTiler
from vlmlab.models.tiling.hd import HDTiler
from vlmlab.models.tiling.idefics import Idefics2Tiler, Idefics3Tiler
from vlmlab.models.tiling.internvl import DynamicTiler
from vlmlab.models.tiling.uhd import UHDTiler
from vlmlab.registry import Registry

TILERS = Registry("tiler")
TILERS["idefics2"] = Idefics2Tiler
TILERS["idefics3"] = Idefics3Tiler
TILERS["dynamic"] = DynamicTiler
TILERS["uhd"] = UHDTiler
TILERS["fuyu"] = FuyuTiler
TILERS["hd"] = HDTiler
