"""ctypes binding of libattn.so: loading, struct layouts, contexts, errors.

Nothing here computes attention; it turns Python objects into the C structs of
include/attn.h. Structs are packed with `struct` into bytes objects (ctypes
passes a bytes object to a `void *` argument as a pointer to its buffer, with
no copy), which is several times cheaper than building ctypes.Structure
instances, and keeps the per-call overhead in the low microseconds.
"""

from __future__ import annotations

import ctypes
import glob
import os
import struct
import threading

__all__ = ["AttnError", "Context", "lib", "library_path", "check", "default_context"]

# ---------------------------------------------------------------- loading


def _find_library() -> str:
    env = os.environ.get("LIBATTN_LIBRARY")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    for sub in ("lib", "lib64"):
        for name in ("libattn.so", "libattn.dylib"):
            path = os.path.join(here, sub, name)
            if os.path.exists(path):
                return path
        found = sorted(glob.glob(os.path.join(here, sub, "libattn.so.*")))
        if found:
            return found[0]
    raise ImportError(
        "libattn: the shared library was not found next to the package "
        f"({here}/lib); install the package with `pip install ./python` "
        "or set LIBATTN_LIBRARY to the path of libattn.so")


library_path = _find_library()
lib = ctypes.CDLL(library_path)

_P = ctypes.c_void_p
_I = ctypes.c_int
_I64 = ctypes.c_int64


def _sig(name, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


attn_last_error = _sig("attn_last_error", ctypes.c_char_p)
attn_status_str = _sig("attn_status_str", ctypes.c_char_p, _I)
attn_version = _sig("attn_version", ctypes.c_char_p)
attn_ctx_create = _sig("attn_ctx_create", _I, _P, _P)
attn_ctx_free = _sig("attn_ctx_free", None, _P)
attn_ctx_threads = _sig("attn_ctx_threads", _I, _P)
attn_ctx_backend = _sig("attn_ctx_backend", _I, _P)
attn_ctx_isa = _sig("attn_ctx_isa", _I, _P)
attn_isa_name = _sig("attn_isa_name", ctypes.c_char_p, _I)
attn_backend_name = _sig("attn_backend_name", ctypes.c_char_p, _I)
attn_isa_detected = _sig("attn_isa_detected", _I)
attn_forward = _sig("attn_forward", _I, _P, _P, _P, _P, _P, _P, _P)
attn_backward = _sig("attn_backward", _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P)
attn_decode = _sig("attn_decode", _I, _P, _P, _P, _P, _P, _P, _P, _P)
attn_lse_merge = _sig("attn_lse_merge", _I, _P, _P, _P, _P, _P, _P, _P)
attn_plan_create = _sig("attn_plan_create", _I, _P, _I64, _I64, _I64, _I64, _I64, _P, _P)
attn_plan_free = _sig("attn_plan_free", None, _P)
attn_plan_density = _sig("attn_plan_density", ctypes.c_double, _P)

# ---------------------------------------------------------------- structs

# attn_tensor: void *data; attn_dtype dtype; int32 ndim; int64 shape[4]; int64 stride[4]
TENSOR = struct.Struct("@Pii4q4q")
# attn_params: float scale, softcap; int32 causal; int64 window_left, window_right,
# batch; const int32 *cu_seqlens_q, *cu_seqlens_k; const attn_plan *plan
PARAMS = struct.Struct("@ffiqqqPPP")
# attn_ctx_options: int32 threads; attn_backend backend; attn_isa isa; uint64 seed
CTX_OPTIONS = struct.Struct("@iiiQ")

F32, F16, BF16, F64 = 0, 1, 2, 3
DTYPE_NAMES = {F32: "f32", F16: "f16", BF16: "bf16", F64: "f64"}

BACKENDS = {"auto": 0, "cpu": 1, "ref": 2}
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3, "neon": 4}

_STATUS = {
    0: "ATTN_OK", 1: "ATTN_ERR_NULL", 2: "ATTN_ERR_SHAPE", 3: "ATTN_ERR_DTYPE",
    4: "ATTN_ERR_ARG", 5: "ATTN_ERR_OVERFLOW", 6: "ATTN_ERR_ALIAS",
    7: "ATTN_ERR_NOMEM", 8: "ATTN_ERR_UNSUPPORTED", 9: "ATTN_ERR_INTERNAL",
}


class AttnError(ValueError):
    """An error status of the C library; str() is attn_last_error()'s sentence.

    Attributes: status (int, the attn_status value) and status_name
    ("ATTN_ERR_SHAPE", ...). Subclasses ValueError, since almost every status
    is a rejected argument; ATTN_ERR_NOMEM is raised as AttnMemoryError.
    """

    def __init__(self, status: int, message: str):
        self.status = status
        self.status_name = _STATUS.get(status, "unknown")
        super().__init__(f"{self.status_name}: {message}")


class AttnMemoryError(AttnError, MemoryError):
    pass


def check(status: int) -> None:
    """Raise AttnError with the C library's message unless status is ATTN_OK."""
    if status:
        raise_status(status)


def raise_status(status: int):
    msg = attn_last_error().decode("utf-8", "replace")
    if not msg:
        msg = attn_status_str(status).decode()
    cls = AttnMemoryError if status == 7 else AttnError
    raise cls(status, msg)


# ---------------------------------------------------------------- contexts


class Context:
    """An attn_ctx: threads, backend ("auto", "cpu", "ref"), ISA, RNG seed.

    threads=0 uses ATTN_NUM_THREADS, else all cores; backend "auto" uses
    ATTN_BACKEND, else the tiled CPU engine; "ref" is the double-precision
    reference (slow; the only one that takes f64 tensors).
    """

    __slots__ = ("_ptr", "_handle", "__weakref__")

    def __init__(self, threads: int = 0, backend: str = "auto", isa: str = "auto",
                 seed: int = 0):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        if isa not in ISAS:
            raise ValueError(f"isa must be one of {sorted(ISAS)}, got {isa!r}")
        opts = CTX_OPTIONS.pack(int(threads), BACKENDS[backend], ISAS[isa], int(seed))
        out = ctypes.c_void_p()
        check(attn_ctx_create(ctypes.byref(out), opts))
        self._ptr = out.value
        self._handle = out

    def __del__(self, _free=attn_ctx_free):
        ptr = getattr(self, "_ptr", None)
        if ptr:
            _free(ptr)
            self._ptr = None

    @property
    def ptr(self) -> int:
        return self._ptr

    @property
    def threads(self) -> int:
        return attn_ctx_threads(self._ptr)

    @property
    def backend(self) -> str:
        return attn_backend_name(attn_ctx_backend(self._ptr)).decode()

    @property
    def isa(self) -> str:
        return attn_isa_name(attn_ctx_isa(self._ptr)).decode()

    def __repr__(self):
        return f"Context(threads={self.threads}, backend={self.backend!r}, isa={self.isa!r})"


_local = threading.local()


def default_context(ref: bool = False) -> Context:
    """The calling thread's default context (ref=True: the reference backend)."""
    key = "ref" if ref else "auto"
    ctx = getattr(_local, key, None)
    if ctx is None:
        ctx = Context(backend="ref") if ref else Context()
        setattr(_local, key, ctx)
    return ctx


def version() -> str:
    return attn_version().decode()


def isa_detected() -> str:
    return attn_isa_name(attn_isa_detected()).decode()

# ---------------------------------------------------------------- linear-time attention
# (present when the library has the chunked-recurrence engine)

# attn_linear_params: float scale; int32 causal; attn_gate gate; int32 chunk;
# int64 batch; const int32 *cu_seqlens
LINEAR_PARAMS = struct.Struct("@fiiiqP")
GATES = {"none": 0, "head": 1, "head_token": 2, "key": 3}
HAS_LINEAR = hasattr(lib, "attn_linear_forward")
if HAS_LINEAR:
    attn_linear_forward = _sig("attn_linear_forward", _I, _P, _P, _P, _P, _P, _P, _P, _P, _P)
    attn_linear_backward = _sig("attn_linear_backward", _I, _P, _P, _P, _P, _P, _P, _P, _P,
                                _P, _P, _P, _P, _P, _P)
    attn_linear_decode = _sig("attn_linear_decode", _I, _P, _P, _P, _P, _P, _P, _P, _P)

# ---------------------------------------------------------------- planners and mechanisms
# (present when the library has them)

# attn_select_opts: int64 block_q, block_k, top_k; float mass;
# int32 keep_diagonal, keep_first, causal; const attn_tensor *lse (AdaSpa; 0 here)
SELECT_OPTS = struct.Struct("@qqqfiiiP")
HAS_PLANNERS = hasattr(lib, "attn_plan_select")
if HAS_PLANNERS:
    attn_plan_static = _sig("attn_plan_static", _I, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64)
    attn_plan_select = _sig("attn_plan_select", _I, _P, _P, _P, _P, _P)
    attn_plan_psa = _sig("attn_plan_psa", _I, _P, _P, _P, _P, _P, ctypes.c_int32, _P)
FEATURE_MAPS = {"identity": 0, "elu1": 1, "relu": 2}
HAS_FEATURE_MAPS = hasattr(lib, "attn_linear_attention")
if HAS_FEATURE_MAPS:
    attn_linear_attention = _sig("attn_linear_attention", _I, _P, _P, ctypes.c_int,
                                 ctypes.c_int32, ctypes.c_float, _P, _P, _P, _P)
