"""Triton kernels for DSF (``y = A·(B·x)``) and single sparse layers, with their pure-torch references.

Public API (what the runtime modules call):

- ``prepare_factor(factor, ...) -> KernelMatrix``: convert a factor once at load time (layouts ``nibble``:
  balanced groups, 4-bit in-group columns; ``delta``: unstructured, 4-bit column deltas; ``dense``).
- ``factorized_matmul(x, kA, kB, bias=None)`` / ``sparse_matmul(x, kW, bias=None)``: choose the decode
  (streaming) or prefill (decompress + cuBLAS) path by token count; CUDA-graph capturable after ``warmup``.
- ``balance_mask`` / ``pack_nibble`` / ``is_balanced``: balanced masks and packing for the compression side;
  ``propose_balanced_split(shape, density)``: ``(N_A, N_B)`` per group of 16 within the DSF budget.

Importing this package registers the kernels with ``dsf_runtime.ops.register_kernel`` (``_ops_hook``): packed
matrices are converted on first use and cached per object.

Each op lives in its own module with ``_<op>_kernel``, ``<op>(...)`` and ``<op>_reference(...)``:
``nibble_matmul``, ``delta_matmul``, ``nibble_unpack``, ``delta_unpack``, ``pack_activations``.
"""

from dsf_runtime.kernels import _interpreter_compat
from dsf_runtime.formats.balanced import balanced_nnz, propose_balanced_split
from dsf_runtime.kernels.dispatch import (
    choose_layout,
    factorized_matmul,
    kernels_available,
    prepare_factor,
    sparse_matmul,
    warmup,
)
from dsf_runtime.kernels.layouts import (
    KernelMatrix,
    balance_mask,
    group_counts,
    is_balanced,
    pack_delta,
    pack_dense,
    pack_nibble,
    unpack,
)

_interpreter_compat.apply()

from dsf_runtime.kernels import _ops_hook  # noqa: E402  (after the imports it needs)

_ops_hook.register()  # dsf_runtime.ops uses the kernels for CUDA inputs from now on

__all__ = [
    "KernelMatrix",
    "balance_mask",
    "balanced_nnz",
    "choose_layout",
    "factorized_matmul",
    "group_counts",
    "is_balanced",
    "kernels_available",
    "pack_delta",
    "pack_dense",
    "pack_nibble",
    "prepare_factor",
    "propose_balanced_split",
    "sparse_matmul",
    "unpack",
    "warmup",
]
