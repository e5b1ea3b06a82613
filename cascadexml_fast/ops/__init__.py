"""Ops: one module per op (schema in _library, kernels dispatched by device, fake impl, autograd).

Modules are named after their op (`ops.shortlist_score` is the module; the function is
`cascadexml_fast.shortlist_score`).
"""
from . import optim, reference, search, shortlist_bce, shortlist_score

__all__ = ["optim", "reference", "search", "shortlist_bce", "shortlist_score"]
