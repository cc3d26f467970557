"""Durable checkpoint files: zip layout, atomic replacement, the async writer."""
