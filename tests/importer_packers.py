"""Test helpers: write GPTQ / AWQ / bitsandbytes tensors from codes, following each format's
documented packing rules, and dequantize them the way each format defines (independent of
runtime.importers' unpacking code)."""
from __future__ import annotations

import numpy as np
import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def words_from_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[R, L]`` -> int32 words ``[R, L*bits/32]``: each row one LSB-first bit stream."""
    R, L = codes.shape
    bitarr = (codes[..., None].astype(np.uint64) >> np.arange(bits, dtype=np.uint64)) & 1   # [R, L, bits]
    bitarr = bitarr.reshape(R, L * bits // 32, 32)
    words = (bitarr << np.arange(32, dtype=np.uint64)).sum(-1)                           # [R, W] < 2**32
    return words.astype(np.uint32).view(np.int32)


def gptq_tensors(N: int, K: int, bits: int, group: int, *, sym: bool, version: int, act_order: bool,
                 rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random GPTQ tensors of one linear and its fp32 dequantized weight ``[N, K]``."""
    g = K if group == -1 else group
    G = -(-K // g)
    q = rng.integers(0, 2 ** bits, size=(K, N))
    if sym:
        z = np.full((G, N), 2 ** (bits - 1))
    else:                                     # v1 cannot hold z = 0 (it stores z - 1): start at 1
        z = rng.integers(1 if version == 1 else 0, 2 ** bits, size=(G, N))
    s = (rng.random((G, N)) * 0.02 + 0.005).astype(np.float16)
    if act_order:
        order = rng.permutation(K)
        g_idx = np.empty(K, dtype=np.int32)
        g_idx[order] = np.arange(K) // g      # the i-th processed column joins group i // g
    else:
        g_idx = (np.arange(K) // g).astype(np.int32)
    stored_z = (z - 1) & (2 ** bits - 1) if version == 1 else z
    t = {"qweight": torch.from_numpy(words_from_codes(q.T, bits).T.copy()),            # [K*b/32, N]
         "qzeros": torch.from_numpy(words_from_codes(stored_z, bits)),                  # [G, N*b/32]
         "scales": torch.from_numpy(s), "g_idx": torch.from_numpy(g_idx)}
    w = s.astype(np.float32)[g_idx, :] * (q - z[g_idx, :]).astype(np.float32)       # [K, N]
    return t, torch.from_numpy(np.ascontiguousarray(w.T))


def awq_tensors(N: int, K: int, group: int, rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random AWQ (gemm) tensors of one linear and its fp32 dequantized weight ``[N, K]``."""
    G = K // group
    q = rng.integers(0, 16, size=(K, N))
    z = rng.integers(0, 16, size=(G, N))
    s = (rng.random((G, N)) * 0.02 + 0.005).astype(np.float16)

    def pack(c):                                          # [R, N] -> [R, N/8] int32
        c = c.reshape(c.shape[0], -1, 8).astype(np.uint64)
        w = sum(c[..., AWQ_ORDER[i]] << np.uint64(4 * i) for i in range(8))
        return torch.from_numpy(w.astype(np.uint32).view(np.int32))
    gi = np.arange(K) // group
    w = s.astype(np.float32)[gi, :] * (q - z[gi, :]).astype(np.float32)
    return ({"qweight": pack(q), "qzeros": pack(z), "scales": torch.from_numpy(s)},
            torch.from_numpy(np.ascontiguousarray(w.T)))


def bnb4_tensors(w: torch.Tensor, quant_type: str, blocksize: int, nested: bool):
    """bitsandbytes' own 4-bit quantization of ``w``, as transformers serializes it
    (``{suffix: tensor}`` under ``owner.weight``) and its fp32 dequantization by the format's rule."""
    import bitsandbytes.functional as bf
    qw, qs = bf.quantize_4bit(w.float(), blocksize=blocksize, quant_type=quant_type,
                              compress_statistics=nested)
    t = {"weight": qw}
    t.update({f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()})
    b = qw.reshape(-1).long()
    codes = torch.stack([b >> 4, b & 15], 1).reshape(-1)          # first value in the high nibble
    if nested:
        a2 = qs.state2.absmax.float().repeat_interleave(256)[: qs.absmax.numel()]
        absmax = qs.state2.code.float()[qs.absmax.long()] * a2 + qs.offset.float()
    else:
        absmax = qs.absmax.float()
    deq = (qs.code.float()[codes].reshape(-1, blocksize) * absmax[:, None]).reshape(w.shape)
    return t, deq, bf.dequantize_4bit(qw, qs).float()


def bnb8_tensors(w: torch.Tensor):
    """bitsandbytes' own LLM.int8 row quantization of ``w`` (weight int8 + SCB) and its
    dequantization as bitsandbytes computes it, ``q * SCB * (1/127)``."""
    import bitsandbytes.functional as bf
    cb, scb, _ = bf.int8_vectorwise_quant(w.half())
    return {"weight": cb, "SCB": scb}, bf.int8_vectorwise_dequant(cb, scb).float()
