"""Which ALBEF parameter belongs to which balancing role (DESIGN.md section 4).

| role    | parameters (names as in ``ALBEF.named_parameters()``)                           |
|---------|---------------------------------------------------------------------------------|
| vision  | ``visual_encoder.*``                                                            |
| text    | ``text_encoder.embeddings.*`` and ``text_encoder.encoder.layer.N.*``, N < fusion_layer |
| head    | fusion layers (N >= fusion_layer), ``vision_proj``, ``text_proj``, ``itm_head``, ``mlm_head``, ``temp`` |
| None    | momentum copies (``*_m.*``): never trained                                      |

Note: the MLM decoder is tied to ``text_encoder.embeddings.word_embeddings.weight`` (a text
branch tensor), so that tensor also receives the MLM head's gradient directly, not only
through the text tokens; a gradient-scaling identity on the text tokens does not scale that
part.
"""
from __future__ import annotations

import re
from typing import Optional

_MOMENTUM = re.compile(r"^(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m|mlm_head_m)\.")
_TEXT_LAYER = re.compile(r"^text_encoder\.encoder\.layer\.(\d+)\.")


def branch_of(name: str, fusion_layer: int) -> Optional[str]:
    """``"vision"``, ``"text"``, ``"head"`` or ``None`` (momentum copy) for a parameter name of
    the online ALBEF model; a leading ``module.`` (DDP / DeepSpeed wrappers) is ignored."""
    while name.startswith("module."):
        name = name[len("module."):]
    if _MOMENTUM.match(name):
        return None
    if name.startswith("visual_encoder."):
        return "vision"
    if name.startswith("text_encoder.embeddings."):
        return "text"
    m = _TEXT_LAYER.match(name)
    if m:
        return "text" if int(m.group(1)) < fusion_layer else "head"
    return "head"
