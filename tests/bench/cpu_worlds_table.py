"""The table of scripts/bench-cpu-worlds.sh: ratios per model and world, the median over repeated runs.

    python3 tests/bench/cpu_worlds_table.py RESULTS_DIR CORES PINNED(0|1)

Reads py-MODEL-wWORLD-rREP.json (tests/bench/python_hooks_bench.py --json) and the
cpp-*.json beside them (ftcomm_bench_hooks --json); writes RESULTS_DIR/table.md.
"""
import glob, json, os, re, statistics, sys
out, cores, pin = sys.argv[1], sys.argv[2], sys.argv[3] not in ("", "0")
runs = {}  # (model, world) -> [(python json, C++ json or None)]
for path in glob.glob(os.path.join(out, "py-*-w*-r*.json")):
    model, world, rep = re.match(r"py-(\w+)-w(\d+)-r(\d+)\.json", os.path.basename(path)).groups()
    cpp = path.replace("py-", "cpp-")
    runs.setdefault((model, int(world)), []).append(
        (json.load(open(path)), json.load(open(cpp)) if os.path.exists(cpp) else None))


def py_ratio(py, method, key):
    row = next((r for r in py["rows"] if r["method"] == method), None)
    return row.get(key) if row else None


def cpp_ratio(cpp, method):
    return cpp.get("ratio", {}).get(method) if cpp else None


def machinery(py):
    rows = {r["method"]: r for r in py["rows"]}
    if "ftcomm noop" in rows and "pytorch noop_hook" in rows:
        return rows["ftcomm noop"]["step_ms"] - rows["pytorch noop_hook"]["step_ms"]
    return None


def cell(values, fmt="{:.3f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    text = fmt.format(statistics.median(values))
    return text if len(values) == 1 else f"{text} ({fmt.format(min(values))} to {fmt.format(max(values))})"


columns = [
    ("ftcomm allreduce / c10d", lambda p, c: py_ratio(p, "ftcomm allreduce", "vs_c10d_builtin")),
    ("/ PyTorch allreduce_hook", lambda p, c: py_ratio(p, "ftcomm allreduce", "vs_pytorch_hook")),
    ("fp16 / FP16_COMPRESS", lambda p, c: py_ratio(p, "ftcomm fp16_compress", "vs_c10d_builtin")),
    ("fp16 / PyTorch", lambda p, c: py_ratio(p, "ftcomm fp16_compress", "vs_pytorch_hook")),
    ("bf16 / PyTorch", lambda p, c: py_ratio(p, "ftcomm bf16_compress", "vs_pytorch_hook")),
    ("powersgd / PyTorch", lambda p, c: py_ratio(p, "ftcomm powersgd r4", "vs_pytorch_hook")),
    ("powersgd, DDP buckets / PyTorch (one bucket)",
     lambda p, c: py_ratio(p, "ftcomm powersgd r4 [DDP buckets]", "vs_pytorch_hook")),
    ("noop / PyTorch noop_hook", lambda p, c: py_ratio(p, "ftcomm noop", "vs_pytorch_hook")),
    ("C++: ts allreduce / builtin", lambda p, c: cpp_ratio(c, "ts allreduce")),
    ("C++: ts fp16 / builtin", lambda p, c: cpp_ratio(c, "ts fp16_compress")),
    ("C++: ts noop / no hook", lambda p, c: cpp_ratio(c, "ts noop")),
]
lines = [f"CPU, Gloo, {cores} cores, ranks {'pinned to cores / world each' if pin else 'not pinned'}; each ratio is "
         "the median over a run's rounds of the round's ratio (below 1: ftcomm faster), then the median over "
         "the runs (their range in brackets)", "",
         "| model | world | threads | runs | " + " | ".join(c[0] for c in columns) + " | machinery ms/step |",
         "| --- " * (len(columns) + 5) + "|"]
for model, world in sorted(runs, key=lambda k: (k[0] != "mlp", k[1])):
    rs = runs[(model, world)]
    threads = rs[0][0].get("threads", "-")
    cells = [cell([f(p, c) for p, c in rs]) for _, f in columns]
    lines.append(f"| {model} | {world} | {threads} | {len(rs)} | " + " | ".join(cells)
                 + f" | {cell([machinery(p) for p, _ in rs], '{:+.2f}')} |")
open(os.path.join(out, "table.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
