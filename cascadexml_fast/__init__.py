"""cascadexml-fast: fused GPU/CPU kernels for extreme multi-label classification."""
__version__ = "0.1.0"

from . import ops  # noqa: E402  (defines the op schemas, fake impls and autograd)
from . import _extension  # noqa: E402,F401  (attaches the C++ CPU kernels, or the reference fallback)
from . import data, metrics  # noqa: E402
from ._info import info  # noqa: E402
from .layers import CascadeHead, ShortlistedLinear  # noqa: E402
from .ops.optim import sparse_adamw_step, sparse_rowwise_adagrad_step  # noqa: E402
from .ops.search import block_score, cascade_search, topk  # noqa: E402
from .ops.shortlist_bce import shortlist_bce  # noqa: E402
from .ops.shortlist_score import shortlist_score  # noqa: E402
from .quantize import quantize, quantize_table  # noqa: E402
from .tree import LabelTree  # noqa: E402
from .optim import SparseAdamW, SparseRowwiseAdagrad  # noqa: E402

__all__ = [
    "CascadeHead",
    "LabelTree",
    "ShortlistedLinear",
    "SparseAdamW",
    "SparseRowwiseAdagrad",
    "__version__",
    "block_score",
    "cascade_search",
    "data",
    "info",
    "metrics",
    "ops",
    "quantize",
    "quantize_table",
    "shortlist_bce",
    "shortlist_score",
    "sparse_adamw_step",
    "sparse_rowwise_adagrad_step",
    "topk",
]
