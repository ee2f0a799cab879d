"""Plotting functions (scanpy/matplotlib styling)."""

__all__: list[str] = []
