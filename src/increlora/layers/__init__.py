"""Adapter layers: the math of each method behind one shared protocol."""

from .base import AdapterLayer, base_shape, is_supported_base
from .triplet import TripletLayer

__all__ = ["AdapterLayer", "TripletLayer", "base_shape", "is_supported_base"]
