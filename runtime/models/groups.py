"""How a decoder layer's linear layers group for calibrated quantization, as data.

Two tables per architecture family, with module names relative to one decoder layer:

* ``sequential``: GPTQ's "true sequential" order. The linears of one tuple share an input and
  are quantized together; the layer is re-run (with the earlier tuples already quantized) to
  collect the inputs of the next tuple.
* ``scales``: AWQ's scale groups. Each ``ScaleGroup`` lists linears reading the same input,
  the op ``prev`` that produces that input (a norm whose weight, or a linear whose output rows,
  absorb ``1/s``), and the module ``inspect`` whose output error judges a scale.

An architecture missing from ``sequential`` falls back to one tuple per linear, in module
order (plain GPTQ without true-sequential grouping); AWQ needs a ``scales`` row. Adding an
architecture is adding a row.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScaleGroup:
    prev: str                      # op whose output feeds ``linears``: norm or linear
    linears: tuple[str, ...]       # linears sharing that input (their input columns are scaled)
    inspect: str                   # module whose output MSE judges the scale (holds ``linears``)


@dataclass(frozen=True)
class LayerGroups:
    sequential: tuple[tuple[str, ...], ...]
    scales: tuple[ScaleGroup, ...]


_Q, _K, _V, _O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
_GATE, _UP, _DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"

_LLAMA_LIKE = LayerGroups(
    sequential=((_Q, _K, _V), (_O,), (_GATE, _UP), (_DOWN,)),
    scales=(ScaleGroup("input_layernorm", (_Q, _K, _V), "self_attn"),
            ScaleGroup(_V, (_O,), _O),                      # only when v_proj's rows match o_proj's input
            ScaleGroup("post_attention_layernorm", (_GATE, _UP), "mlp"),
            ScaleGroup(_UP, (_DOWN,), _DOWN)),
)

GROUPS: dict[str, LayerGroups] = {name: _LLAMA_LIKE for name in ("llama", "mistral", "qwen2", "qwen3")}


def groups_for(model_type: str, need_scales: bool = False) -> LayerGroups | None:
    """The row for ``model_type``; None when unknown (GPTQ then uses module order).

    Raises ValueError naming the architecture when ``need_scales`` (AWQ) and it is unknown.
    """
    row = GROUPS.get(model_type)
    if row is None and need_scales:
        raise ValueError(f"AWQ has no scale groups for architecture {model_type!r} (known: "
                         f"{', '.join(sorted(GROUPS))}); add a row to runtime/models/groups.py "
                         "or use method='gptq'")
    return row
