"""Confide: confidential computing among parties who do not trust each other."""

__version__ = "0.1.0"
