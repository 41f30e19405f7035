"""MASS: many fine-tuned CLIP vision encoders served as one (arXiv 2504.05342)."""
from .adapters import AlreadyWrappedError
from .checkpoints import CheckpointError
from .decompose import LowRankFactors, TaskDecomposition, decompose
from .evaluation import EvalResult, evaluate
from .heads import Head, Heads, zero_shot_heads
from .layers import MASSConv2d, MASSLayerNorm, MASSLinear, MASSMultiheadAttention
from .merging import MERGE_METHODS, task_arithmetic, ties_merging, tsv_merge
from .model import Classification, MASSModel, extract_embedding, merge
from .router import RouterConfig, Routing, select_tasks
from .serialization import SavedModelError
from .support import SupportFit, UnknownTaskError

__all__ = [
    "AlreadyWrappedError", "CheckpointError", "Classification", "EvalResult", "Head", "Heads", "LowRankFactors",
    "MASSConv2d", "MASSLayerNorm", "MASSLinear", "MASSModel", "MASSMultiheadAttention", "MERGE_METHODS",
    "RouterConfig", "Routing", "SavedModelError", "SupportFit", "TaskDecomposition", "UnknownTaskError",
    "decompose", "evaluate", "extract_embedding", "merge", "select_tasks", "task_arithmetic", "ties_merging",
    "tsv_merge", "zero_shot_heads",
]
__version__ = "0.1.0"
