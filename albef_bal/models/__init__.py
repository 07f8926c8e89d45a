"""Model definitions: the ViT image encoder, the BERT text/fusion encoder, and ALBEF."""
from .albef import ALBEF, ALBEFOutput, build_model
from .text import MLMHead, TextEncoder
from .vit import VisionTransformer, build_vision_encoder, resize_pos_embed

__all__ = ["ALBEF", "ALBEFOutput", "build_model", "MLMHead", "TextEncoder", "VisionTransformer",
           "build_vision_encoder", "resize_pos_embed"]
