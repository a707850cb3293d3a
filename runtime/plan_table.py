"""Rendering a Placement as the table `exa plan` prints (kept apart from the pure planner)."""
from __future__ import annotations

import re

from runtime.units import fmt_bytes


def _groups(p) -> list[tuple[str, str, list[int]]]:
    """(label, tier, sizes) rows; consecutive blocks of one tier and kind become one range."""
    rows: list[tuple[list[str], str, str, list[int]]] = []
    for b, t in zip(p.blocks, p.tiers):
        if rows and rows[-1][1:3] == (t, b.kind):
            rows[-1][0].append(b.name)
            rows[-1][3].append(b.nbytes)
        else:
            rows.append(([b.name], t, b.kind, [b.nbytes]))
    return [(_range_label(names), t, sizes) for names, t, _, sizes in rows]


def _range_label(names: list[str]) -> str:
    first, last = (re.fullmatch(r"(.*?)(\d+)", n) for n in (names[0], names[-1]))
    if len(names) == 1:
        return names[0]
    return f"{names[0]}-{last.group(2)}" if first and last and first.group(1) == last.group(1) \
        else f"{names[0]}..{names[-1]}"


def _size_text(sizes: list[int]) -> str:
    if len(sizes) == 1:
        return fmt_bytes(sizes[0])
    each = f"{len(sizes)} x {fmt_bytes(sizes[0])}" if len(set(sizes)) == 1 else f"{len(sizes)} blocks"
    return f"{each} = {fmt_bytes(sum(sizes))}"


def _secs(s: float) -> str:
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


def render(p) -> str:
    wl, b, by = p.workload, p.budgets, p.bytes_by_tier()
    lines = [f"Placement on {p.device}: {len(p.blocks)} blocks, {fmt_bytes(sum(by.values()))}, "
             f"prefetch depth {p.prefetch_depth}", f"  {'block':<22}{'tier':<6}{'home':<10}size"]
    for label, tier, sizes in _groups(p):
        home = "resident" if tier == p.compute_tier else "streamed"
        lines.append(f"  {label:<22}{tier:<6}{home:<10}{_size_text(sizes)}")
    lines += [f"Device memory ({'GPU' if p.device == 'cuda' else 'RAM'}):",
              f"  resident blocks   {fmt_bytes(p.resident_bytes)}",
              f"  stream slots      {p.slots} x {fmt_bytes(p.slot_bytes)} = {fmt_bytes(p.slots * p.slot_bytes)}",
              f"  KV cache          {fmt_bytes(p.kv_budget)} (batch {wl.batch} x {wl.context} tokens)",
              f"  activations       {fmt_bytes(p.activations)} (batch {wl.batch} x prompt {wl.prompt})",
              f"  overhead          {fmt_bytes(p.overhead)}",
              f"  total             {fmt_bytes(p.device_bytes)} of {fmt_bytes(b.device)} budget"]
    if p.device == "cuda":
        lines.append(f"Pinned host RAM: {fmt_bytes(by['cpu'])} blocks + {fmt_bytes(p.staging_bytes)} "
                     f"disk staging of {fmt_bytes(b.cpu)} budget")
    lines += [f"Disk: {fmt_bytes(by['disk'])} of {'unlimited' if b.disk is None else fmt_bytes(b.disk)} budget",
              f"Predicted (batch {wl.batch}, prompt {wl.prompt}):",
              f"  decode   {_rate(p.decode_tok_s)} tok/s  ({_secs(p.decode_s)}/step: transfer "
              f"{_secs(p.transfer_s)}, compute {_secs(p.compute_s)}; bound by {p.decode_bound})",
              f"  prefill  {_rate(p.prefill_tok_s)} tok/s  ({_secs(p.prefill_s)}/prompt: transfer "
              f"{_secs(p.transfer_s)}, compute {_secs(p.prefill_compute_s)}; bound by {p.prefill_bound})"]
    return "\n".join(lines)
