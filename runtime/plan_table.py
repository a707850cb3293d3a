"""Rendering a Placement as the table `exa plan` prints (kept apart from the pure planner)."""
from __future__ import annotations

import math
import re

from runtime.units import fmt_bytes


def _home(p, b, t) -> str:
    if t == p.compute_tier:
        return "resident"
    if b.name in p.host_compute:
        return "CPU lookup"
    on = [ph for ph, s in (("decode", p.cpu_compute), ("prefill", p.cpu_compute_prefill)) if b.name in s]
    return "streamed" if not on else "CPU " + "+".join(on)


def _groups(p) -> list[tuple[str, str, str, list[int]]]:
    """(label, tier, home, sizes) rows; consecutive blocks of one tier, kind and home: one range."""
    rows: list[tuple[list[str], str, str, str, list[int]]] = []
    for b, t in zip(p.blocks, p.tiers):
        key = (t, b.kind, _home(p, b, t))
        if rows and rows[-1][1:4] == key:
            rows[-1][0].append(b.name)
            rows[-1][4].append(b.nbytes)
        else:
            rows.append(([b.name], *key, [b.nbytes]))
    return [(_range_label(names), t, home, sizes) for names, t, _, home, sizes in rows]


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
    if not math.isfinite(s):
        return "unknown"
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _rate(x: float) -> str:
    return "?" if x == 0 else f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


def _hybrid_lines(p) -> list[str]:
    """The hybrid CPU/GPU choice per phase: what was chosen, streaming only, the best with CPU."""
    if not p.cpu_candidates():
        return []
    bw, n = p.bandwidths, len(p.cpu_candidates())
    rates = (f"CPU matmul {bw.cpu_mem / 1e9:.1f} GB/s, {bw.cpu_flops / 1e9:.0f} GFLOP/s" if bw.has_cpu
             else "CPU matmul rates not measured")
    lines = [f"Hybrid CPU/GPU ({n} pinned-RAM layer blocks could run on the CPU; {rates}):"]
    for phase, chosen, total, stream in (("decode", p.cpu_compute, p.decode_s, p.decode_stream_s),
                                         ("prefill", p.cpu_compute_prefill, p.prefill_s, p.prefill_stream_s)):
        best, best_s = p.hybrid_alternative(phase)
        pick = f"{len(chosen)} on the CPU, {_secs(total)}" if chosen else "stream all"
        alt = f"best with CPU: {len(best)} on the CPU, {_secs(best_s)}" if best else "no CPU option"
        lines.append(f"  {phase:<8} chosen: {pick}  (stream all {_secs(stream)}; {alt})")
    return lines


def render(p) -> str:
    wl, b, by = p.workload, p.budgets, p.bytes_by_tier()
    lines = [f"Placement on {p.device}: {len(p.blocks)} blocks, {fmt_bytes(sum(by.values()))}, "
             f"prefetch depth {p.prefetch_depth}", f"  {'block':<22}{'tier':<6}{'home':<13}size"]
    for label, tier, home, sizes in _groups(p):
        lines.append(f"  {label:<22}{tier:<6}{home:<13}{_size_text(sizes)}")
    lines += [f"Device memory ({'GPU' if p.device == 'cuda' else 'RAM'}):",
              f"  resident blocks   {fmt_bytes(p.resident_bytes)}",
              f"  stream slots      {p.slots} x {fmt_bytes(p.slot_bytes)} = {fmt_bytes(p.slots * p.slot_bytes)}",
              f"  KV cache          {fmt_bytes(p.kv_budget)} (batch {wl.batch} x {wl.context} tokens)",
              f"  activations       {fmt_bytes(p.activations)} (batch {wl.batch} x prompt {wl.prompt})",
              f"  overhead          {fmt_bytes(p.overhead)}",
              f"  total             {fmt_bytes(p.device_bytes)} of {fmt_bytes(b.device)} budget"]
    if p.device == "cuda":
        extra = sum(x.cpu_extra for x in p.cpu_blocks())
        lines.append(f"Pinned host RAM: {fmt_bytes(by['cpu'])} blocks + {fmt_bytes(p.staging_bytes)} "
                     f"disk staging" + (f" + {fmt_bytes(extra)} CPU-kernel copies" if extra else "")
                     + f" of {fmt_bytes(b.cpu)} budget")
    lines += [f"Disk: {fmt_bytes(by['disk'])} of {'unlimited' if b.disk is None else fmt_bytes(b.disk)} budget",
              f"Predicted (batch {wl.batch}, prompt {wl.prompt}):",
              f"  decode   {_rate(p.decode_tok_s)} tok/s  ({_secs(p.decode_s)}/step: transfer "
              f"{_secs(p.transfer_s)}, compute {_secs(p.compute_s)}{_cpu(p.cpu_s)}; bound by {p.decode_bound})",
              f"  prefill  {_rate(p.prefill_tok_s)} tok/s  ({_secs(p.prefill_s)}/prompt: transfer "
              f"{_secs(p.prefill_transfer_s)}, compute {_secs(p.prefill_compute_s)}{_cpu(p.prefill_cpu_s)}; "
              f"bound by {p.prefill_bound})"]
    return "\n".join(lines + _hybrid_lines(p))


def _cpu(s: float) -> str:
    return f", CPU {_secs(s)}" if s else ""
