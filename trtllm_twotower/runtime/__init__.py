"""Runtime: executors behind one interface, the sampler, and the Python API."""

from .api import BlockEvent, GenerationResult, PreparedRequest, TwoTowerRuntime
from .lanes import StepEvent

__all__ = ["BlockEvent", "GenerationResult", "PreparedRequest", "StepEvent", "TwoTowerRuntime"]
