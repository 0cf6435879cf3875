"""Serving on vLLM: engines, plugins and their integration points."""
