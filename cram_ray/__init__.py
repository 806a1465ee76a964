"""Continual instruction tuning of multimodal LLMs with CRAM, run on Ray."""
__version__ = "0.1.0"
