"""The OpenAI-compatible surface (``/v1``), following OpenAI's API reference."""
