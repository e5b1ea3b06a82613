"""cascadexml-fast: fused GPU/CPU kernels for extreme multi-label classification."""
__version__ = "0.1.0"

from . import ops  # noqa: E402  (defines the op schemas, fake impls and autograd)
from . import _extension  # noqa: E402,F401  (attaches the C++ CPU kernels, or the reference fallback)
from . import data, metrics  # noqa: E402
from ._extension import set_cpu_isa  # noqa: E402
from ._info import info  # noqa: E402
from .hugepages import to_hugepages  # noqa: E402
from .layers import CascadeHead, ShortlistedLinear  # noqa: E402
from .ops.optim import sparse_adamw_step, sparse_rowwise_adagrad_step  # noqa: E402
from .ops.search import block_score, cascade_search, topk  # noqa: E402
from .ops.shortlist_bce import shortlist_bce  # noqa: E402
from .ops.shortlist_score import shortlist_score  # noqa: E402
from .quantize import quantize, quantize_table  # noqa: E402
from .tree import LabelTree  # noqa: E402
from .optim import SparseAdamW, SparseRowwiseAdagrad  # noqa: E402

# The models pull in transformers: loaded on first use (cx.CascadeXML, cx.models...), not at import.
_LAZY_MODEL_NAMES = ("CascadeXML", "CascadeXMLConfig", "LightXML", "LightXMLConfig", "load_pretrained")


def __getattr__(name):
    if name == "models" or name in _LAZY_MODEL_NAMES:
        import importlib

        models = importlib.import_module(".models", __name__)
        return models if name == "models" else getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CascadeHead",
    "CascadeXML",
    "CascadeXMLConfig",
    "LabelTree",
    "LightXML",
    "LightXMLConfig",
    "ShortlistedLinear",
    "SparseAdamW",
    "SparseRowwiseAdagrad",
    "__version__",
    "block_score",
    "cascade_search",
    "data",
    "info",
    "load_pretrained",
    "metrics",
    "models",
    "ops",
    "quantize",
    "quantize_table",
    "shortlist_bce",
    "set_cpu_isa",
    "shortlist_score",
    "sparse_adamw_step",
    "sparse_rowwise_adagrad_step",
    "to_hugepages",
    "topk",
]
