"""DSF's factor split, in one place: the density of the square factor (``square_factor_density``) and its rounding
to balanced groups (``propose_balanced_split``, ``balanced_nnz``).

DSF (docs/dsf-algorithm.md §1.2) factors ``W`` (m × n) through the inner dimension ``k = min(m, n)``: the square
factor (``A`` when m < n, ``B`` otherwise) gets density 0.16 (square ``W``) or 0.25 of its ``k²`` area and the
rectangular one the rest of ``nnz = density·m·n``. With balanced groups each density is ``N / G``;
``propose_balanced_split`` rounds the split to integers while never exceeding the budget.
"""

from __future__ import annotations

import math

__all__ = ["balanced_nnz", "propose_balanced_split", "square_factor_density"]


def square_factor_density(m: int, n: int) -> float:
    """Density of DSF's square ``k×k`` factor (``k = min(m, n)``) for a ``W`` of ``m × n``: 0.16 when ``W`` is
    square, else 0.25 (the reference code's split)."""
    return 0.16 if m == n else 0.25


def balanced_nnz(rows: int, cols: int, per_group: int, group: int = 16) -> int:
    """Non-zeros of a ``rows × cols`` matrix with ``per_group`` per full group (a last partial group of width
    ``w`` keeps ``min(per_group, w)``)."""
    full, rem = divmod(cols, group)
    return rows * (full * per_group + min(per_group, rem))


def propose_balanced_split(shape: tuple[int, int], density: float, group: int = 16,
                           square_density: float | None = None) -> dict:
    """Propose ``(N_A, N_B)`` slots per group of ``group`` columns for a DSF layer.

    Among all integer pairs whose total stays within ``int(density·m·n)`` it takes the pair closest (relative
    error of each factor's density, summed) to DSF's split: the square factor at ``square_density`` (default
    ``square_factor_density(m, n)``), the rectangular factor the rest of the budget; ties go to the larger total.

    Args:
        shape: ``(m, n)`` = (out, in) of ``W``.
        density: total density of both factors, relative to ``m·n``.
        group: ``G`` (1..16).
        square_density: override of the square factor's density.

    Returns:
        ``{"N_A", "N_B", "group", "A_shape", "B_shape", "square": "A"|"B", "nnz_A", "nnz_B", "nnz", "budget",
        "density", "density_A", "density_B"}``.

    Raises:
        ValueError: the budget cannot hold one slot per group in each factor.

    Example:
        >>> p = propose_balanced_split((4096, 11008), 0.5)
        >>> p["N_A"], p["N_B"], p["square"]
        (4, 6, 'A')
    """
    m, n = int(shape[0]), int(shape[1])
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not 1 <= group <= 16:
        raise ValueError(f"group must be in 1..16, got {group}")
    k = min(m, n)
    a_shape, b_shape = (m, k), (k, n)
    square = "A" if m < n else "B"
    sq_shape, rect_shape = (a_shape, b_shape) if square == "A" else (b_shape, a_shape)
    budget = int(m * n * density)
    asp = square_density if square_density is not None else square_factor_density(m, n)
    rect_target = max((budget - asp * math.prod(sq_shape)) / math.prod(rect_shape), 1e-9) * group
    best = None
    for n_sq in range(1, group + 1):
        for n_rect in range(1, group + 1):
            total = balanced_nnz(*sq_shape, n_sq, group) + balanced_nnz(*rect_shape, n_rect, group)
            if total > budget:
                break
            dev = abs(n_sq - asp * group) / (asp * group) + abs(n_rect - rect_target) / rect_target
            key = (-round(dev, 9), total)
            if best is None or key > best[0]:
                best = (key, n_sq, n_rect)
    if best is None:
        raise ValueError(f"density {density} of a {m}x{n} layer cannot give each factor one non-zero per group "
                         f"of {group}; raise the density or use a smaller group")
    _, n_sq, n_rect = best
    n_a, n_b = (n_sq, n_rect) if square == "A" else (n_rect, n_sq)
    nnz_a, nnz_b = balanced_nnz(*a_shape, n_a, group), balanced_nnz(*b_shape, n_b, group)
    return {
        "N_A": n_a, "N_B": n_b, "group": group, "A_shape": a_shape, "B_shape": b_shape, "square": square,
        "nnz_A": nnz_a, "nnz_B": nnz_b, "nnz": nnz_a + nnz_b, "budget": budget,
        "density": (nnz_a + nnz_b) / (m * n), "density_A": nnz_a / math.prod(a_shape),
        "density_B": nnz_b / math.prod(b_shape),
    }
