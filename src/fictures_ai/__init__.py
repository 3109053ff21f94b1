"""Fictures AI Server: text (vLLM) and image (diffusers) generation over HTTP."""

__version__ = "0.1.0"
