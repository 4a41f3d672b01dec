"""Data helpers (graph benchmarks' protocol; the arrow-pointing images)."""

from .arrows import ArrowGeometry, ArrowPointing

__all__ = ["ArrowGeometry", "ArrowPointing"]
