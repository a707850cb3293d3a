"""Private copies of the Triton kernel modules that run through Triton's CPU interpreter.

``triton.jit`` decides at decoration time whether a function is compiled or interpreted (from
``TRITON_INTERPRET``), and that includes triton.language's own helpers (``tl.zeros``, ...), so
triton itself must first be imported with the variable set: :func:`enable_interpreter` does that
(only when nothing imported triton before). :func:`load_interpreted` then imports fresh copies
of the kernel modules with the variable set, and puts the original modules (if any) and the
variable back, so the rest of the process sees triton and the kernels as before.
"""
from __future__ import annotations

import importlib
import os
import sys
import types

import pytest

KERNEL_MODULES = ("runtime.kernels.tuning", "runtime.kernels.tl_dequant", "runtime.kernels.dequant",
                  "runtime.kernels.splitk", "runtime.kernels.int_gemv_simt", "runtime.kernels.int_gemv_planes",
                  "runtime.kernels.int_gemv",
                  "runtime.kernels.int_gemm", "runtime.kernels.nf4_gemv_simt", "runtime.kernels.nf4_gemv",
                  "runtime.kernels.nf4_gemm",
                  "runtime.kernels.dispatch")


def _patch_numpy2_index() -> None:
    """Triton 3.6's interpreter turns scalars into 1-element arrays and calls ``int()`` on them in
    ``range()``; numpy >= 2.4 refuses that. Re-patch ``__index__`` to take the single element."""
    from triton.runtime import interpreter as it
    if getattr(it, "_exa_index_patch", False):
        return
    original = it._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    it._patch_lang_tensor = patched
    it._exa_index_patch = True


def enable_interpreter() -> bool:
    """Import triton in interpreter mode; False when triton was already imported compiled."""
    if "triton" not in sys.modules:
        old_env = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import triton.language  # noqa: F401
            import triton.experimental.gluon  # noqa: F401  (imported lazily at launch otherwise)
        finally:
            if old_env is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old_env
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(tl.zeros, InterpretedFunction):
        return False
    _patch_numpy2_index()
    return True


def load_interpreted(names=KERNEL_MODULES) -> types.SimpleNamespace:
    """Fresh interpreted copies of ``names``; ``ns.<last name part>`` is each module."""
    if not enable_interpreter():
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set")
    saved = {n: sys.modules.pop(n, None) for n in names}
    pkg = sys.modules.get("runtime.kernels")
    saved_attrs = {n: getattr(pkg, n.rsplit(".", 1)[1], None) for n in names} if pkg else {}
    old_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    ns = types.SimpleNamespace()
    try:
        for n in names:
            setattr(ns, n.rsplit(".", 1)[1], importlib.import_module(n))
    finally:
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env
        for n in names:
            if saved[n] is not None:
                sys.modules[n] = saved[n]
            else:
                sys.modules.pop(n, None)
            if pkg is not None:
                short = n.rsplit(".", 1)[1]
                if saved_attrs.get(n) is not None:
                    setattr(pkg, short, saved_attrs[n])
                elif hasattr(pkg, short):
                    delattr(pkg, short)
    return ns


def kernel_fixtures(interp_ok: bool):
    """The fixtures of a test file of interpreted kernels: ``K`` (interpreted copies of the kernel
    modules, skipping without the interpreter) and an autouse one setting TRITON_INTERPRET.
    Use: ``K, _interpret_env = kernel_fixtures(INTERP_OK)`` at the file's top level."""
    @pytest.fixture(scope="module")
    def K():
        """Interpreted copies of the kernel modules (CPU only)."""
        if not interp_ok:
            pytest.skip("needs the CPU interpreter")
        return load_interpreted()

    @pytest.fixture(autouse=True)
    def _interpret_env(monkeypatch):
        """Triton reads TRITON_INTERPRET lazily at launch as well: set it for these tests only."""
        if interp_ok:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    return K, _interpret_env
