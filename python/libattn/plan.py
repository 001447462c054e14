"""Block plans: for each query block, the key blocks the engine visits."""

from __future__ import annotations

import ctypes

import numpy as np

from . import _lib

ENTRY_DTYPE = np.dtype([("key_block", "<i4"), ("level", "u1"), ("mask", "u1"),
                        ("reserved", "<u2")])
BLOCK_FULL, BLOCK_PARAMS = 0, 1


def _need(name):
    if not hasattr(_lib, name):
        raise NotImplementedError(f"this libattn build has no {name}")


class Plan:
    """An attn_plan (built once, reused across calls and layers).

    Plan(n, m, block_q, block_k, heads, row_offsets, key_blocks, masks=None):
    row_offsets int64 [heads * ceil(n / block_q) + 1] (CSR offsets),
    key_blocks int32 [row_offsets[-1]] ascending within a row, masks uint8
    (BLOCK_FULL: the whole block is visible; BLOCK_PARAMS: apply the call's
    causal/window rule per element; default BLOCK_PARAMS). heads is 1
    (shared), Hk (per GQA group) or H.
    """

    __slots__ = ("_ptr", "n", "m", "block_q", "block_k", "heads")

    def __init__(self, n, m, block_q, block_k, heads, row_offsets, key_blocks, masks=None):
        self._ptr = None
        offs = np.ascontiguousarray(row_offsets, dtype=np.int64)
        kb = np.ascontiguousarray(key_blocks, dtype=np.int32)
        entries = np.zeros(len(kb), dtype=ENTRY_DTYPE)
        entries["key_block"] = kb
        entries["mask"] = BLOCK_PARAMS if masks is None else np.asarray(masks, dtype=np.uint8)
        out = ctypes.c_void_p()
        _lib.check(_lib.attn_plan_create(ctypes.byref(out), int(n), int(m), int(block_q),
                                         int(block_k), int(heads), offs.ctypes.data,
                                         entries.ctypes.data if len(entries) else None))
        self._ptr = out.value
        self.n, self.m, self.block_q, self.block_k, self.heads = n, m, block_q, block_k, heads

    @classmethod
    def from_block_mask(cls, block_mask, n, m, block_q, block_k, masks=None):
        """A plan from a boolean block mask [heads, ceil(n/block_q), ceil(m/block_k)]
        (or 2-d, shared by all heads); masks as in Plan (same shape, or None)."""
        bm = np.asarray(block_mask, dtype=bool)
        if bm.ndim == 2:
            bm = bm[None]
        if bm.ndim != 3:
            raise ValueError(f"block_mask: expected 2 or 3 dims, got shape {bm.shape}")
        heads, nqb, nkb = bm.shape
        counts = bm.reshape(heads * nqb, nkb).sum(axis=1)
        offs = np.zeros(heads * nqb + 1, dtype=np.int64)
        np.cumsum(counts, out=offs[1:])
        kb = np.nonzero(bm.reshape(heads * nqb, nkb))[1].astype(np.int32)
        mk = None
        if masks is not None:
            mk = np.broadcast_to(np.asarray(masks, dtype=np.uint8), bm.shape)[bm]
        return cls(n, m, block_q, block_k, heads, offs, kb, mk)

    @classmethod
    def _adopt(cls, out, n, m, block_q, block_k, heads):
        self = cls.__new__(cls)
        self._ptr = out.value
        self.n, self.m, self.block_q, self.block_k, self.heads = n, m, block_q, block_k, heads
        return self

    @classmethod
    def static(cls, n, m, block_q, block_k, local, stride=0, global_tokens=0):
        """A static pattern (attn_plan_static, heads = 1): a band of `local`
        key blocks ending at the diagonal, every `stride`-th key block before
        it (0: none), and the blocks of the first `global_tokens` tokens."""
        _need("attn_plan_static")
        out = ctypes.c_void_p()
        _lib.check(_lib.attn_plan_static(ctypes.byref(out), int(n), int(m), int(block_q),
                                         int(block_k), int(local), int(stride),
                                         int(global_tokens)))
        return cls._adopt(out, n, m, block_q, block_k, 1)

    @classmethod
    def select(cls, q, k, block_q=64, block_k=64, top_k=0, mass=0.0, keep_diagonal=True,
               keep_first=True, causal=False, ctx=None):
        """Dynamic block selection from mean-pooled Q and K blocks
        (attn_plan_select): per query head and block, the `top_k` best key
        blocks, or (top_k = 0) the fewest whose estimated mass reaches `mass`.
        q [B, N, H, D], k [B, M, Hk, D] (batch 0 is used); H heads."""
        _need("attn_plan_select")
        from ._ops import _ctx_for, _view

        pq, oq, sq, dq, _ = _view(q, "q")
        pk, ok, sk, _, _ = _view(k, "k")
        opts = _lib.SELECT_OPTS.pack(int(block_q), int(block_k), int(top_k), float(mass),
                                     int(bool(keep_diagonal)), int(bool(keep_first)),
                                     int(bool(causal)), 0)
        out = ctypes.c_void_p()
        _lib.check(_lib.attn_plan_select(_ctx_for(ctx, dq), ctypes.byref(out), pq, pk, opts))
        return cls._adopt(out, sq[1], sk[1], block_q, block_k, sq[2])

    @classmethod
    def psa(cls, q, k, quota, block_q=64, block_k=64, keep_diagonal=True, causal=False,
            ctx=None):
        """Pyramid Sparse Attention levels (attn_plan_psa): the best fraction
        quota[0] of each query block's key blocks at full resolution, the next
        quota[1] pooled by 2, ...; the rest skipped."""
        _need("attn_plan_psa")
        from ._ops import _ctx_for, _view

        pq, oq, sq, dq, _ = _view(q, "q")
        pk, ok, sk, _, _ = _view(k, "k")
        qa = np.ascontiguousarray(quota, dtype=np.float32)
        opts = _lib.SELECT_OPTS.pack(int(block_q), int(block_k), 0, 0.0,
                                     int(bool(keep_diagonal)), 0, int(bool(causal)), 0)
        out = ctypes.c_void_p()
        _lib.check(_lib.attn_plan_psa(_ctx_for(ctx, dq), ctypes.byref(out), pq, pk, opts,
                                      len(qa), qa.ctypes.data))
        return cls._adopt(out, sq[1], sk[1], block_q, block_k, sq[2])

    @property
    def ptr(self) -> int:
        return self._ptr

    @property
    def density(self) -> float:
        """Fraction of the n x m logits the plan visits."""
        return _lib.attn_plan_density(self._ptr)

    def __del__(self, _free=_lib.attn_plan_free):
        if getattr(self, "_ptr", None):
            _free(self._ptr)
            self._ptr = None

    def __repr__(self):
        return (f"Plan(n={self.n}, m={self.m}, block_q={self.block_q}, block_k={self.block_k}, "
                f"heads={self.heads}, density={self.density:.3f})")
