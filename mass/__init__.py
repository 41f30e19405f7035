"""MASS: many fine-tuned CLIP vision encoders served as one (arXiv 2504.05342).

The package is laid out in wings, each importing only the wings below it (``docs/architecture.md``):
``mass_kernels`` (the ops) ← :mod:`mass.files` (what users bring, atomic writes) ← :mod:`mass.method` (pure
functions: decomposition, merges, routers) ← :mod:`mass.storage` (the saved artifact) ← :mod:`mass.nn` (the
wrapped encoder, :class:`MASSModel`, :func:`merge`) ← :mod:`mass.evaluation` ← :mod:`mass.tools` (CLI, benches,
demo). This module re-exports the public API.
"""
from mass.evaluation.heads import Head, Heads, zero_shot_heads
from mass.evaluation.protocol import EvalResult, evaluate
from mass.files.checkpoints import CheckpointError
from mass.method.decompose import LowRankFactors, TaskDecomposition, decompose
from mass.method.merging import MERGE_METHODS, task_arithmetic, ties_merging, tsv_merge
from mass.method.router import RouterConfig, Routing, select_tasks
from mass.method.support import SupportFit, UnknownTaskError
from mass.nn.adapters import AlreadyWrappedError
from mass.nn.layers import MASSConv2d, MASSLayerNorm, MASSLinear, MASSMultiheadAttention
from mass.nn.merge import merge
from mass.nn.model import Classification, MASSModel, extract_embedding
from mass.storage.saved_format import SavedModelError

__all__ = [
    "AlreadyWrappedError", "CheckpointError", "Classification", "EvalResult", "Head", "Heads", "LowRankFactors",
    "MASSConv2d", "MASSLayerNorm", "MASSLinear", "MASSModel", "MASSMultiheadAttention", "MERGE_METHODS",
    "RouterConfig", "Routing", "SavedModelError", "SupportFit", "TaskDecomposition", "UnknownTaskError",
    "decompose", "evaluate", "extract_embedding", "merge", "select_tasks", "task_arithmetic", "ties_merging",
    "tsv_merge", "zero_shot_heads",
]
__version__ = "0.1.0"
