"""High-resolution tilers: an image -> several fixed-size views whose features follow each other.

[Contract] A tiler is built as ``TILERS[name](**params)`` and has ``views(image, side) -> list[PIL.Image]`` (each
``side`` x ``side``, in the order their features are spliced) and ``num_views((height, width), side) -> int``
(the same count without the pixels, so the processor and the model always agree). It may define
``token_ids(size, side, tokens_per_view, image_token_id, tokenizer) -> list[int]`` for a layout with text between
views (e.g. row and column markers); otherwise an image is ``num_views * tokens_per_view`` placeholders.
Add one: a file in this folder and one line below. LLaVA-NeXT AnyRes (``anyres.py``) packs its tiles' features
into one map with newlines and unpadding, so it has its own settings (``ProcessorConfig.anyres``).
"""

from vlmlab.models.tiling.idefics import Idefics2Tiler, Idefics3Tiler
from vlmlab.models.tiling.internvl import DynamicTiler
from vlmlab.models.tiling.uhd import UHDTiler
from vlmlab.registry import Registry

TILERS = Registry("tiler")
TILERS["idefics2"] = Idefics2Tiler
TILERS["idefics3"] = Idefics3Tiler
TILERS["dynamic"] = DynamicTiler
TILERS["uhd"] = UHDTiler
