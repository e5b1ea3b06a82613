"""Ops: one module per op (schema in _library, kernels dispatched by device, fake impl, autograd)."""
from . import reference
from .shortlist_score import shortlist_score

__all__ = ["reference", "shortlist_score"]
