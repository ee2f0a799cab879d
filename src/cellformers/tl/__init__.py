"""Scanpy-style tools over the model API: results are written into AnnData."""

__all__: list[str] = []
