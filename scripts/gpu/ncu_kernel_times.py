# Sums an Nsight Compute CSV log by kernel (the per-kernel tables of docs/perf-notes.md):
#   ncu --csv --print-units base --metrics gpu__time_duration.sum[,launch__grid_size] CMD > LOG.csv
#   python3 scripts/gpu/ncu_kernel_times.py [--by-grid] [--parts] LOG.csv...
# --by-grid keys each kernel by (name, grid size) too, which tells GEMM shapes apart (needs the
# launch__grid_size metric), and prints the cuBLAS (`nvjet`/`xmma`/`gemm`) total.
# --parts also sums one training step (from its first `embedding_gather` on) by part of the
# step; cuBLAS kernels whose (name, grid) group averages under 40 us a launch are the skinny
# LoRA products and their split-K reductions (at the 8B shapes these groups take <= 31 us a
# launch, the smallest frozen GEMM, k/v at 34 GFLOP, 45 us), the others the frozen GEMMs.
import csv, sys, collections, signal

# Piped into `head`: stop quietly when the reader goes away.
signal.signal(signal.SIGPIPE, signal.SIG_DFL)

SKINNY_US = 40.0
# Kernel-name prefixes of each non-GEMM part, first match wins.
PARTS = [
    ("attention", ("flash", "rope_dq_convert")),
    ("SwiGLU (with gate/up's adapter gradients)", ("swiglu",)),
    ("RMSNorm", ("rmsnorm",)),
    ("LoRA t/dB", ("lora",)),
    ("loss", ("ce_",)),
    ("RoPE", ("rope",)),
    ("optimizer", ("adamw",)),
]


def is_gemm(name):
    return any(s in name for s in ("nvjet", "xmma", "gemm", "splitKreduce"))


def launches_of(path):
    rows = list(csv.reader(open(path)))
    rows = rows[next(i for i, r in enumerate(rows) if "Kernel Name" in r):]
    h = rows[0]
    ki, mi, vi, ii = (h.index(c) for c in ("Kernel Name", "Metric Name", "Metric Value", "ID"))
    launches = {}
    for r in rows[1:]:
        launches.setdefault(r[ii], {"name": r[ki]})[r[mi]] = r[vi].replace(",", "")
    return list(launches.values())  # launch order


def ms_of(launch):
    return float(launch.get("gpu__time_duration.sum", 0)) * 1e-6  # base unit: ns


def parts(launches):
    first = next(i for i, l in enumerate(launches) if "embedding_gather" in l["name"])
    step = launches[first:]
    groups = collections.defaultdict(list)
    for l in step:
        if is_gemm(l["name"]):
            groups[(l["name"], l.get("launch__grid_size", ""))].append(ms_of(l))
    out = collections.Counter()
    for times in groups.values():
        skinny = 1e3 * sum(times) / len(times) < SKINNY_US
        out["LoRA GEMMs and split-K reductions" if skinny else "frozen GEMMs"] += sum(times)
    for l in step:
        if is_gemm(l["name"]):
            continue
        part = next((p for p, prefixes in PARTS if l["name"].startswith(prefixes)), "the rest")
        out[part] += ms_of(l)
    total = sum(out.values())
    print(f"   step from embedding_gather: {total:.2f} ms over {len(step)} launches")
    for part, ms in out.most_common():
        print(f"{ms:9.2f} ms  {part}")


by_grid = "--by-grid" in sys.argv
for path in [a for a in sys.argv[1:] if not a.startswith("--")]:
    launches = launches_of(path)
    tot = collections.defaultdict(float)
    cnt = collections.Counter()
    for l in launches:
        key = (l["name"][:90], l.get("launch__grid_size", "") if by_grid else "")
        tot[key] += ms_of(l)
        cnt[key] += 1
    all_ms = sum(tot.values())
    gemm = sum(v for (n, _), v in tot.items() if any(s in n for s in ("nvjet", "xmma", "gemm")))
    print(f"== {path}: {all_ms:.2f} ms over {sum(cnt.values())} launches, cuBLAS {gemm:.2f} ms")
    for key, ms in sorted(tot.items(), key=lambda x: -x[1])[:45]:
        grid = f" grid {key[1]:>6}" if by_grid else ""
        print(f"{ms:9.3f} ms {100 * ms / all_ms:5.1f}% {cnt[key]:6d}x{grid}  {key[0]}")
    if "--parts" in sys.argv:
        parts(launches)
