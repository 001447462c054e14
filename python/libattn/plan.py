"""Block plans: for each query block, the key blocks the engine visits."""

from __future__ import annotations

import ctypes

import numpy as np

from . import _lib

ENTRY_DTYPE = np.dtype([("key_block", "<i4"), ("level", "u1"), ("mask", "u1"),
                        ("reserved", "<u2")])
BLOCK_FULL, BLOCK_PARAMS = 0, 1


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

    @property
    def ptr(self) -> int:
        return self._ptr

    @property
    def density(self) -> float:
        """Fraction of the n x m logits the plan visits."""
        return _lib.attn_plan_density(self._ptr)

    def __del__(self):
        if getattr(self, "_ptr", None):
            _lib.attn_plan_free(self._ptr)
            self._ptr = None

    def __repr__(self):
        return (f"Plan(n={self.n}, m={self.m}, block_q={self.block_q}, block_k={self.block_k}, "
                f"heads={self.heads}, density={self.density:.3f})")
