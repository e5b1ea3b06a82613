"""The `cascadexml_fast` torch library: every op schema, defined once.

Schemas live here rather than in C++ so the ops exist even when the compiled extension cannot load (then the
reference implementations are registered instead, see cascadexml_fast/_extension.py). The C++ extension only
attaches CPU kernels to these names (csrc/bindings.cpp); the Triton kernels are attached for CUDA in the op
modules. Flags that only the autograd formula reads (sparse_grad, deterministic) are part of the forward schema
so that a compiled graph carries them.

Schema history: `sparse_adamw_step` gained `bool stochastic_rounding=False, int seed=0` (trailing, defaulted, so
older callers are unaffected): with a bf16 / fp16 table the fp32 result is rounded stochastically with a
counter-based hash of (seed, step, row, column), identical on every backend (ops/reference.py, stochastic_round).

int8 label tables (inference): `shortlist_score`, `shortlist_score_grad_input` and `block_score` gained a trailing
`Tensor? weight_scale=None`, and `cascade_search` a trailing `Tensor?[]? weight_scales=None` (one entry per level,
None for a float table). With a scale, `weight` is an int8 table [N, D] standing for the fp32 rows
`weight[r].float() * weight_scale[r]` (row-wise symmetric quantisation, no zero point; weight_scale fp32 [N]);
without one, `weight` is a float table exactly as before. Trailing and defaulted, so older callers are unaffected.
The scale has no gradient (int8 tables are inference-only; dx flows through the dequantised rows).
"""
import torch

NAMESPACE = "cascadexml_fast"

SCHEMAS = {
    "shortlist_score": (
        "shortlist_score(Tensor x, Tensor weight, Tensor? bias, Tensor idx, bool sparse_grad=False, "
        "bool deterministic=False, Tensor? weight_scale=None) -> Tensor"
    ),
    "shortlist_score_grad_input": (
        "shortlist_score_grad_input(Tensor grad, Tensor weight, Tensor idx, Tensor? weight_scale=None) -> Tensor"
    ),
    "shortlist_score_grad_weight": (
        "shortlist_score_grad_weight(Tensor grad, Tensor x, Tensor idx, SymInt num_rows, "
        "bool deterministic=False, ScalarType? dtype=None) -> (Tensor, Tensor)"
    ),
    "shortlist_score_grad_weight_rows": (
        "shortlist_score_grad_weight_rows(Tensor grad, Tensor x, Tensor idx, ScalarType? dtype=None) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    "topk": "topk(Tensor scores, int k, Tensor? mask=None) -> (Tensor, Tensor)",
    "block_score": (
        "block_score(Tensor x, Tensor weight, Tensor? bias, Tensor clusters, Tensor offsets, int max_children, "
        "Tensor? weight_scale=None) -> (Tensor, Tensor)"
    ),
    "cascade_search": (
        "cascade_search(Tensor[] features, Tensor[] weights, Tensor?[] biases, Tensor[] offsets, int[] beams, "
        "int[] max_children, int k, str combine=\"leaf\", Tensor?[]? weight_scales=None) -> (Tensor, Tensor)"
    ),
    "sparse_adamw_step": (
        "sparse_adamw_step(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor rows, Tensor grad, "
        "int step, float lr, float beta1, float beta2, float eps, float weight_decay, Tensor(d!)? last_step=None, "
        "Tensor? lr_history=None, bool stochastic_rounding=False, int seed=0) -> ()"
    ),
    # Row-wise AdaGrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): one fp32 accumulator per row. `step` only feeds the
    # stochastic-rounding hash (with `seed`); stochastic_rounding matters only for bf16 / fp16 tables.
    "sparse_rowwise_adagrad_step": (
        "sparse_rowwise_adagrad_step(Tensor(a!) param, Tensor(b!) state_sum, Tensor rows, Tensor grad, float lr, "
        "float eps, float weight_decay, int step=0, bool stochastic_rounding=False, int seed=0) -> ()"
    ),
    # AdamW with 8-bit block-quantised moments, lazy semantics only (ops/reference.py, sparse_adamw8bit_step):
    # uint8 codes [N, D] and fp32 block absmax scales [N, ceil(D / 256)] per moment.
    "sparse_adamw8bit_step": (
        "sparse_adamw8bit_step(Tensor(a!) param, Tensor(b!) exp_avg_codes, Tensor(c!) exp_avg_scales, "
        "Tensor(d!) exp_avg_sq_codes, Tensor(e!) exp_avg_sq_scales, Tensor rows, Tensor grad, int step, float lr, "
        "float beta1, float beta2, float eps, float weight_decay, bool stochastic_rounding=False, int seed=0) -> ()"
    ),
    "shortlist_bce": (
        "shortlist_bce(Tensor x, Tensor weight, Tensor? bias, Tensor idx, Tensor pos_offsets, Tensor pos_ids, "
        "float level_weight=1.0, bool sparse_grad=False, bool deterministic=False) -> (Tensor, Tensor, Tensor)"
    ),
}

LIBRARY = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    LIBRARY.define(_schema)


def op(name: str):
    """The OpOverloadPacket `torch.ops.cascadexml_fast.<name>`."""
    return getattr(getattr(torch.ops, NAMESPACE), name)


def call(op, *args):
    """``op(*args)``, skipping the autograd layer where it has nothing to record.

    torch.library's autograd kernel for an op with a Python backward (shortlist_score, shortlist_bce) runs in
    Python on every call, and where grad mode is off or no input requires grad it only re-dispatches below
    autograd. Doing that here gives the same result without the round trip: measured on the 2-core EPYC
    (benchmarks/microbench/call_overhead.py) ~4 us less per call with warm caches and tens of us less with cold
    ones, which is most of a B = 1 shortlist. While a compiler traces or a functorch transform is active, the op is
    called as usual.
    """
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
