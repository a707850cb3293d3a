"""Where the time of loading a model goes on this host, piece by piece (diagnostic).

    python3 benchmarks/load_probe.py --dir .bench --gib 8 --out load_probe.json

Measures, each in a fresh process where it matters:
  imports     interpreter + ``import torch`` / ``exa`` / transformers' config and Llama modules
  pin         page-locking GIB of host memory: torch's pinned allocator (cudaHostAlloc), the
              same with ``pinned_use_cuda_host_register`` (malloc + threads touching pages +
              cudaHostRegister), and our own mmap + threaded touch + cudaHostRegister (with and
              without transparent huge pages)
  read        GIB of shard files from a warm page cache: ``cat``, then reader threads (1..16)
              into pinned memory, with and without sha256, and into fresh (unfaulted) memory
  h2d         pinned -> GPU copies alone and while the readers run
"""
from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))           # runtime.tiers, run from anywhere
GiB = 1 << 30
CHUNK = 64 << 20


def _py(code: str, env: dict | None = None) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, **(env or {})},
                   cwd=str(HERE.parent))
    return time.perf_counter() - t


LLAMA70B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192,
            "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192}


def imports(root: Path) -> dict:
    cfg = root / "config70b"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "config.json").write_text(json.dumps(LLAMA70B))
    codes = {"python": "pass", "torch": "import torch", "exa": "import exa",
             "transformers_config": "from transformers import AutoConfig, LlamaConfig",
             "transformers_llama": "from transformers.models.llama import modeling_llama",
             "autoconfig_from_pretrained": f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(cfg)!r})"}
    out = {k: [round(_py(c), 3) for _ in range(2)] for k, c in codes.items()}
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", codes["autoconfig_from_pretrained"]],
                       capture_output=True, text=True, cwd=str(HERE.parent))
    rows = []
    for line in r.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    out["slowest_cumulative_us"] = sorted(rows, reverse=True)[:25]
    return out


def pin_one(method: str, gib: float) -> dict:
    """One pinning method in this process (call in a fresh process)."""
    import torch
    size = int(gib * GiB)
    torch.cuda.init()
    res = {"method": method, "bytes": size}
    t = time.perf_counter()
    if method.startswith("torch"):
        bufs = [torch.empty(min(GiB, size - o), dtype=torch.uint8, pin_memory=True) for o in range(0, size, GiB)]
        res["alloc_s"] = time.perf_counter() - t
        src = bufs[0]
    else:                                   # exa's own route (runtime.tiers.populated_empty) ...
        if "touch" in method:
            from runtime.tiers import populated_empty
            buf = populated_empty(size, threads=16, huge="huge" in method)
        else:                               # ... or untouched memory, faulted in by the driver
            buf = torch.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
                                   dtype=torch.uint8)
        res["touch_s"] = time.perf_counter() - t
        t2 = time.perf_counter()
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 0)
        res["register_s"] = time.perf_counter() - t2
        res["register_err"] = int(err)
        res["alloc_s"] = time.perf_counter() - t
        src = buf[:GiB]
    res["GBps"] = size / res["alloc_s"] / 1e9
    dst = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(4):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    res["h2d_GBps"] = 4 * GiB / (time.perf_counter() - t) / 1e9
    res["is_pinned"] = bool(src.is_pinned())
    return res


def make_files(root: Path, gib: float, n: int = 16) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    per = int(gib * GiB) // n // 4096 * 4096
    block = os.urandom(CHUNK)
    files = []
    for i in range(n):
        p = root / f"probe-{i:02d}.bin"
        if not p.exists() or p.stat().st_size != per:
            with open(p, "wb") as f:
                for o in range(0, per, CHUNK):
                    f.write(block[: min(CHUNK, per - o)])
        files.append(p)
    return files


def _read(p: Path, mv: memoryview, hash_it: bool) -> None:
    fd = os.open(p, os.O_RDONLY)
    h = hashlib.sha256() if hash_it else None
    try:
        pos = 0
        while pos < len(mv):
            got = os.preadv(fd, [mv[pos:pos + CHUNK]], pos)
            if got <= 0:
                break
            if h is not None:
                h.update(mv[pos:pos + got])
            pos += got
    finally:
        os.close(fd)


def read_one(files: list[Path], threads: int, dest: str, hash_it: bool) -> dict:
    import torch
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes)
    if dest == "pinned":
        torch.cuda.init()
        buf = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        mv = memoryview(buf.numpy()).cast("B")
    else:                                                   # fresh pages, faulted by the reads
        m = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mv = memoryview(m)
    offs = [sum(sizes[:i]) for i in range(len(files))]
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda i: _read(files[i], mv[offs[i]:offs[i] + sizes[i]], hash_it), range(len(files))))
    s = time.perf_counter() - t
    return {"threads": threads, "dest": dest, "sha256": hash_it, "s": s, "GBps": total / s / 1e9}


def h2d_while_reading(files: list[Path]) -> dict:
    import torch
    src = torch.empty(2 * GiB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(2 * GiB, dtype=torch.uint8, device="cuda")
    dst.copy_(src); torch.cuda.synchronize()
    t = time.perf_counter(); dst.copy_(src); torch.cuda.synchronize()
    alone = 2 * GiB / (time.perf_counter() - t) / 1e9
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(read_one, files, 16, "pinned", True)
        time.sleep(0.5)
        t = time.perf_counter()
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        busy = 6 * GiB / (time.perf_counter() - t) / 1e9
        r = fut.result()
    return {"h2d_alone_GBps": alone, "h2d_while_reading_GBps": busy, "reading": r}


def _sub(args: list[str], env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, cwd=str(HERE.parent))
    if r.returncode:
        return {"error": r.stderr[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=".bench")
    ap.add_argument("--gib", type=float, default=8.0)
    ap.add_argument("--out", default="load_probe.json")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)      # internal: one measurement
    a = ap.parse_args(argv)
    if a.one:
        kind, *rest = a.one.split(":")
        files = sorted(Path(a.dir, "probe").glob("probe-*.bin"))
        if kind == "pin":
            r = pin_one(rest[0], a.gib)
        elif kind == "read":
            r = read_one(files, int(rest[0]), rest[1], rest[2] == "1")
        else:
            r = h2d_while_reading(files)
        print(json.dumps(r))
        return 0
    import torch
    if not torch.cuda.is_available():
        print("load_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    res: dict = {"gib": a.gib, "cpus": os.cpu_count()}
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    res["thp"] = thp.read_text().strip() if thp.exists() else None
    t = time.perf_counter()
    res["imports"] = imports(Path(a.dir))
    print("imports", json.dumps(res["imports"])[:600], f"({time.perf_counter() - t:.0f} s)", flush=True)
    res["pin"] = []
    for m in ("torch", "torch_register", "mmap_touch_register", "mmap_touch_huge_register", "mmap_register"):
        env = {"PYTORCH_CUDA_ALLOC_CONF": "pinned_use_cuda_host_register:True,pinned_num_register_threads:16"} \
            if m == "torch_register" else None
        res["pin"].append(_sub(["--gib", str(a.gib), "--one", f"pin:{m}"], env))
        print("pin", json.dumps(res["pin"][-1])[:400], flush=True)
    t = time.perf_counter()
    files = make_files(Path(a.dir, "probe"), a.gib)
    res["write_s"] = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(f"cat {' '.join(map(str, files))} > /dev/null", shell=True, check=True)
    res["cat_s"] = time.perf_counter() - t
    res["cat_GBps"] = sum(p.stat().st_size for p in files) / res["cat_s"] / 1e9
    print(f"cat {res['cat_s']:.2f} s = {res['cat_GBps']:.1f} GB/s", flush=True)
    res["read"] = []
    for spec in ("1:pinned:0", "4:pinned:0", "8:pinned:0", "16:pinned:0", "16:pinned:1", "8:pinned:1",
                 "16:fresh:0", "16:fresh:1"):
        res["read"].append(_sub(["--dir", a.dir, "--one", f"read:{spec}"]))
        print("read", json.dumps(res["read"][-1])[:300], flush=True)
    res["h2d"] = _sub(["--dir", a.dir, "--one", "h2d"])
    print("h2d", json.dumps(res["h2d"])[:400], flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
