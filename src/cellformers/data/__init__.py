"""Placeholder, filled in by the owning layer."""
