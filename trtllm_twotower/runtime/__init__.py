"""Runtime: executors behind one interface, the sampler, and the Python API."""

from .api import BlockEvent, GenerationResult, PreparedRequest, TwoTowerRuntime
from .lanes import StepEvent
from .sampler import TokenLogprob

__all__ = ["BlockEvent", "GenerationResult", "PreparedRequest", "StepEvent", "TokenLogprob", "TwoTowerRuntime"]
