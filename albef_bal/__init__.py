"""albef_bal: ALBEF vision-language pretraining with DeepSpeed, WebDataset and
modality-balancing methods.

Importing the package is cheap and has no side effects; the heavy pieces load on first use:

    from albef_bal import load_for_inference, load_pretrained, load_config, ALBEF
"""
__version__ = "0.1.0"

_LAZY = {
    "ALBEF": ("albef_bal.models.albef", "ALBEF"),
    "build_model": ("albef_bal.models.albef", "build_model"),
    "load_for_inference": ("albef_bal.inference", "load_for_inference"),
    "load_pretrained": ("albef_bal.checkpoints", "load_pretrained"),
    "export_model": ("albef_bal.checkpoints", "export_model"),
    "load_config": ("albef_bal.config", "load_config"),
    "Config": ("albef_bal.config", "Config"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'albef_bal' has no attribute '{name}'")


__all__ = list(_LAZY)
