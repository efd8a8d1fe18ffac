"""Squall: a real-time event server on Tornado."""

__version__ = "0.1.0"
