"""Ops: one module per op (schema in _library, kernels dispatched by device, fake impl, autograd).

Modules are named after their op (`ops.shortlist_score` is the module; the function is
`cascadexml_fast.shortlist_score`).
"""
from . import reference, search, shortlist_score

__all__ = ["reference", "search", "shortlist_score"]
