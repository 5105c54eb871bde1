"""Runtime: executors behind one interface, the sampler, and the Python API."""

from .api import BlockEvent, GenerationResult, TwoTowerRuntime

__all__ = ["BlockEvent", "GenerationResult", "TwoTowerRuntime"]
