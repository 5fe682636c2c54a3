"""Moved to :mod:`odysseus.plan.presets`."""

from .plan.presets import HARDWARE, MODELS, Assumptions, Hardware, Model, get_hardware, get_model

__all__ = ["HARDWARE", "MODELS", "Assumptions", "Hardware", "Model", "get_hardware", "get_model"]
