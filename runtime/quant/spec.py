"""Quantization formats as data: what a quantized linear layer stores and how to read it back.

Every format turns a weight ``W [out, in]`` (``in`` = K, ``out`` = N) into a few named tensors
(the *packed* tensors), all stored in the block buffer next to the layer's other weights:

* ``int`` (bits 2, 3, 4, 8), group-wise along K (``group_size`` 32/64/128, or -1 = per channel;
  G = ceil(K/g) groups, the last one may be shorter; K a multiple of 8 for 3 bits):
    - ``qweight`` uint8 ``[N, K*bits/8]``: codes packed along K inside each row. bits 8: one code
      per byte; bits 4: code k in byte k//2, low nibble for even k; bits 2: code k in byte k//4
      at bit 2*(k%4); bits 3: two planes one after the other, the low 2 bits (4 per byte, K/4
      bytes, as bits 2) then the high bit (8 per byte, K/8 bytes, code k at bit k%8).
    - ``scales`` float16 ``[N, G]``.
    - symmetric: ``W = (q - 2**(bits-1)) * s``;
      ``zero_mode="int"``: + ``zeros`` uint8 ``[N, G]``, ``W = (q - z) * s``  (GPTQ/AWQ grids);
      ``zero_mode="min"``: + ``mins`` float16 ``[N, G]``, ``W = q * s + m``  (GGUF Q4_1 grid).
* ``nf4`` / ``fp4`` (bitsandbytes values and block layout): W flattened row-major, blocks of
  ``group_size`` (default 64) consecutive values, one absmax per block (K must be a multiple of
  the block size, so a block never straddles two rows; -1 = one block per row):
    - ``qweight`` uint8 ``[N*K/2]``: two 4-bit codes per byte, the FIRST value in the HIGH nibble.
    - ``absmax`` float32 ``[N*K/g]``; ``W = CODE[q] * absmax``.
    - ``double_quant``: absmax itself stored as uint8 codes ``absmax_q [N*K/g]`` over the 8-bit
      dynamic map in blocks of 256 with ``absmax2`` float32 ``[ceil(N*K/g/256)]`` and an
      ``offset`` float32 ``[1]`` (the mean subtracted first), like bitsandbytes' compress_statistics:
      ``absmax = DYN[absmax_q] * absmax2[i // 256] + offset`` with DYN = bitsandbytes'
      ``create_dynamic_map()`` (256 sorted values, DYN[0] = -0.99297, DYN[255] = 1) and
      ``absmax2`` = max |absmax - offset| over its run of 256.
* ``act_order`` (int only; imported GPTQ "desc_act" checkpoints): the layer also stores
  ``perm`` int32 ``[K]``; the packed weight's columns are the original columns in ``perm`` order
  (``Wp[:, j] = W[:, perm[j]]``, so every group is contiguous) and ``y = x[..., perm] @ Wp.T``.
* ``int8`` (LLM.int8 style): ``qweight`` int8 ``[N, K]``, ``scales`` float32 ``[N]`` (row absmax/127);
  at run time the input columns whose magnitude exceeds ``threshold`` (any row) are multiplied
  in 16-bit with the dequantized weight columns, the rest in int8 with int32 accumulation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

FORMATS = ("int", "nf4", "fp4", "int8")


@dataclass(frozen=True)
class QuantSpec:
    fmt: str = "int"              # one of FORMATS
    bits: int = 4                 # int: 2, 3, 4, 8; nf4/fp4: 4; int8: 8
    group_size: int = 128         # int: 32/64/128/... or -1 (per channel); nf4/fp4: block size
    sym: bool = False             # int only
    zero_mode: str = "min"        # int asym only: "int" | "min"
    double_quant: bool = False    # nf4/fp4 only
    threshold: float = 6.0        # int8 only: outlier threshold
    act_order: bool = False       # int only: + perm int32 [K], input columns gathered first

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown quantization format {self.fmt!r}; known: {', '.join(FORMATS)}")
        allowed = {"int": (2, 3, 4, 8), "nf4": (4,), "fp4": (4,), "int8": (8,)}[self.fmt]
        if self.bits not in allowed:
            raise ValueError(f"{self.fmt} supports bits {allowed}, got {self.bits}")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"group_size must be -1 or a positive multiple of 8, got {self.group_size}")
        if self.zero_mode not in ("int", "min"):
            raise ValueError(f"zero_mode must be 'int' or 'min', got {self.zero_mode!r}")
        if self.act_order and self.fmt != "int":
            raise ValueError(f"act_order (an input permutation) exists for fmt 'int' only, not {self.fmt!r}")

    @property
    def name(self) -> str:
        if self.fmt != "int":
            return self.fmt + ("-dq" if self.double_quant else "")
        g = "pc" if self.group_size == -1 else f"g{self.group_size}"
        perm = "-perm" if self.act_order else ""
        return f"int{self.bits}-{g}-{'sym' if self.sym else 'asym-' + self.zero_mode}{perm}"

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(obj: dict) -> "QuantSpec":
        return QuantSpec(**obj)


def spec_from_name(name: str | QuantSpec | None, *, bits: int | None = None, group_size: int | None = None,
                   sym: bool = False, double_quant: bool = False, threshold: float = 6.0) -> QuantSpec | None:
    """A QuantSpec from a user-facing name: "int4", "int3", "int2", "int8" (LLM.int8), "nf4", "fp4".

    group_size defaults to 128 for the int formats and 64 (bitsandbytes' block) for nf4/fp4.
    ``bits`` may be given instead of / beside the name ("int" + bits=3 is "int3").
    """
    if name is None or isinstance(name, QuantSpec):
        return name
    key = str(name).lower().replace("-", "").replace("_", "")
    if key == "int" and bits is not None:
        key = f"int{bits}"
    if key in ("nf4", "fp4"):
        spec = QuantSpec(key, 4, group_size or 64, double_quant=double_quant)
    elif key == "int8":
        spec = QuantSpec("int8", 8, -1, threshold=threshold)
    elif key in ("int2", "int3", "int4"):
        spec = QuantSpec("int", int(key[3]), group_size or 128, sym=sym)
    else:
        raise ValueError(f"unknown quantization {name!r}: use int4, int3, int2, int8, nf4 or fp4")
    if bits is not None and bits != spec.bits:
        raise ValueError(f"quant_type {name!r} has {spec.bits} bits, but bits={bits} was given")
    return spec
