"""Confidential dataflow, the client side and the engines (outside the TCB).

``Flow`` builds a job from sealed inputs with PySpark-RDD-like operators; an engine
(``LocalEngine``) schedules its tasks on enclave workers (``confide.enclave.flow``) and moves only
sealed batches; ``open_result`` gives a recipient the verified result.
"""

from confide.flow.api import Dataset, Flow, FlowError, ShufflePadding, seal_description
from confide.flow.engine import Endpoint, LocalEngine, terminal_progress
from confide.flow.results import open_manifest, open_result, seal_text

__all__ = [
    "Dataset",
    "Endpoint",
    "Flow",
    "FlowError",
    "LocalEngine",
    "ShufflePadding",
    "open_manifest",
    "open_result",
    "seal_description",
    "seal_text",
    "terminal_progress",
]
