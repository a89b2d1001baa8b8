# Sums an `ncu --csv --metrics gpu__time_duration.sum --print-units base` log by kernel name:
# python3 scripts/gpu/ncu_kernel_times.py LOG.csv (the per-kernel tables of docs/perf-notes.md).
import csv, sys, collections
rows = list(csv.reader(open(sys.argv[1])))
rows = rows[next(i for i, r in enumerate(rows) if "Kernel Name" in r):]
hdr = rows[0]; ki = hdr.index("Kernel Name"); vi = hdr.index("Metric Value"); ui = hdr.index("Metric Unit")
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in rows[1:]:
    try: v = float(r[vi].replace(",", ""))
    except ValueError: continue
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "ns": 1e-6}.get(r[ui], 1e-6)
    name = r[ki][:90]; tot[name] += v * scale; cnt[name] += 1
all_ms = sum(tot.values())
print(f"total {all_ms:.2f} ms over {sum(cnt.values())} launches")
for name, ms in sorted(tot.items(), key=lambda x: -x[1])[:45]:
    print(f"{ms:9.3f} ms {100*ms/all_ms:5.1f}% {cnt[name]:6d}x  {name}")
