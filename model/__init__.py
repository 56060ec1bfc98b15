"""The model: `from model import LMConfig, LM`."""

from .config import PRESETS, LMConfig
from .model import LM, KVCache

__all__ = ["LM", "LMConfig", "KVCache", "PRESETS"]
