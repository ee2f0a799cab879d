"""Minimal stand-in for the abandoned torchtext package.

The official scGPT package imports ``torchtext.vocab.Vocab`` at import time; only that
name is needed to import its model classes for comparison tests.
"""
