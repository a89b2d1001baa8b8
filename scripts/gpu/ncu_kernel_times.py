# Sums an Nsight Compute CSV log by kernel (the per-kernel tables of docs/perf-notes.md):
#   ncu --csv --print-units base --metrics gpu__time_duration.sum[,launch__grid_size] CMD > LOG.csv
#   python3 scripts/gpu/ncu_kernel_times.py [--by-grid] LOG.csv...
# --by-grid keys each kernel by (name, grid size) too, which tells GEMM shapes apart (needs the
# launch__grid_size metric), and prints the cuBLAS (`nvjet`/`xmma`/`gemm`) total.
import csv, sys, collections, signal

# Piped into `head`: stop quietly when the reader goes away.
signal.signal(signal.SIGPIPE, signal.SIG_DFL)

by_grid = "--by-grid" in sys.argv
for path in [a for a in sys.argv[1:] if a != "--by-grid"]:
    rows = list(csv.reader(open(path)))
    rows = rows[next(i for i, r in enumerate(rows) if "Kernel Name" in r):]
    h = rows[0]
    ki, mi, vi, ii = (h.index(c) for c in ("Kernel Name", "Metric Name", "Metric Value", "ID"))
    launches = collections.defaultdict(dict)
    for r in rows[1:]:
        launches[(r[ii], r[ki])][r[mi]] = r[vi].replace(",", "")
    tot = collections.defaultdict(float)
    cnt = collections.Counter()
    for (_, name), m in launches.items():
        ms = float(m.get("gpu__time_duration.sum", 0)) * 1e-6  # base unit: ns
        key = (name[:90], m.get("launch__grid_size", "") if by_grid else "")
        tot[key] += ms
        cnt[key] += 1
    all_ms = sum(tot.values())
    gemm = sum(v for (n, _), v in tot.items() if any(s in n for s in ("nvjet", "xmma", "gemm")))
    print(f"== {path}: {all_ms:.2f} ms over {sum(cnt.values())} launches, cuBLAS {gemm:.2f} ms")
    for key, ms in sorted(tot.items(), key=lambda x: -x[1])[:45]:
        grid = f" grid {key[1]:>6}" if by_grid else ""
        print(f"{ms:9.3f} ms {100 * ms / all_ms:5.1f}% {cnt[key]:6d}x{grid}  {key[0]}")
