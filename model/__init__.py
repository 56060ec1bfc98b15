"""The model: `from model import LMConfig, LM`."""

from .config import PRESETS, LMConfig
from .generation import KVCache
from .model import LM

__all__ = ["LM", "LMConfig", "KVCache", "PRESETS"]
