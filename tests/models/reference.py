"""Float64 NumPy implementations of the textbook equations, the independent reference."""

from __future__ import annotations

import numpy as np


def softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def attention(q, k, v, mask=None):
    """q [B,T,H,D], k/v [B,S,K,D] (K divides H), mask bool [B,1|H,T,S] → [B,T,H,D]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    heads, kv_heads = q.shape[2], k.shape[2]
    out = np.zeros(q.shape)
    for h in range(heads):
        kh = h // (heads // kv_heads)  # Query head h reads key/value head h // group size.
        scores = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, kh]) / np.sqrt(q.shape[-1])
        if mask is not None:
            m = np.broadcast_to(mask, (q.shape[0], heads, q.shape[1], k.shape[1]))[:, h]
            scores = np.where(m, scores, -1e30)
        out[:, :, h] = np.einsum("bts,bsd->btd", softmax(scores), v[:, :, kh])
    return out


def multi_head_attention(x, wq, wk, wv, wo, bq=None, bk=None, bv=None, bo=None, mask=None):
    """Y = concat_h(softmax(Q_h K_hᵀ / √d_k) V_h) W_O with Q = X W_Q (+ b), etc."""
    x = np.asarray(x, np.float64)
    q = np.einsum("btd,dhk->bthk", x, wq) + (0 if bq is None else bq)
    k = np.einsum("btd,dhk->bthk", x, wk) + (0 if bk is None else bk)
    v = np.einsum("btd,dhk->bthk", x, wv) + (0 if bv is None else bv)
    heads = attention(q, k, v, mask)
    concat = heads.reshape(*heads.shape[:2], -1)
    return concat @ np.asarray(wo, np.float64).reshape(concat.shape[-1], -1) + (
        0 if bo is None else bo
    )
