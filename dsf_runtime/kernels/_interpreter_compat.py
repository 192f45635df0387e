"""Make triton 3.6's CPU interpreter (``TRITON_INTERPRET=1``) work with numpy >= 2.4.

The interpreter stores scalars as 1-element numpy arrays and converts them with ``int(array)`` when a kernel uses
one as a Python index (``for s in range(0, S, BLOCK)``); numpy 2.4 made that conversion an error ("only
0-dimensional arrays can be converted to Python scalars"). ``apply()`` wraps the interpreter's tensor patch so the
conversion goes through ``.item()``. It touches nothing when the interpreter is off or already fixed.
"""

from __future__ import annotations

__all__ = ["apply"]

_applied = False


def apply() -> None:
    """Install the fix once (idempotent)."""
    global _applied
    if _applied:
        return
    _applied = True
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - triton without the interpreter
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_dsf_compat", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._dsf_compat = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
