#!/usr/bin/python3
"""Plots bench_mla's JSON output (Google Benchmark, --benchmark_out_format=json).

    scripts/plot_bench.py build/release/bench_mla.json docs/

writes docs/cache_size.png (bytes per token and layer per architecture; whole-model cache
against context length) and docs/decode_speed.png (decode step time against context, per path),
and prints a Markdown table of the decode figures as fractions of the peak measured in the run.
Needs Debian's python3-matplotlib (./run.sh plot installs it).
"""
import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    with open(path) as f:
        doc = json.load(f)
    rows = {}
    for b in doc["benchmarks"]:
        if b.get("run_type", "iteration") != "iteration" or b.get("error_occurred"):
            continue
        name = b["name"].replace("/min_time:0.200", "").replace("/manual_time", "")
        rows[name] = b
    return doc.get("context", {}), rows


def plot_cache(rows, out):
    archs = ["mha", "gqa16", "gqa8", "gqa4", "gqa2", "gqa1", "mqa", "mla_fp32", "mla_bf16", "mla_fp8"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, preset in enumerate(["v2lite", "v3"]):
        vals = [rows.get(f"cache_bytes/{a}/{preset}", {}).get("bytes_per_token_per_layer", 0) for a in archs]
        xs = [x + 0.4 * i for x in range(len(archs))]
        ax1.bar(xs, vals, width=0.4, label=preset)
    ax1.set_xticks([x + 0.2 for x in range(len(archs))], archs, rotation=40, ha="right")
    ax1.set_yscale("log")
    ax1.set_ylabel("bytes per token per layer")
    ax1.set_title("KV cache per token (baselines in BF16, head dim 128)")
    ax1.legend()
    ctx = [4096, 32768, 131072]
    keys = ["model_bytes_4k", "model_bytes_32k", "model_bytes_128k"]
    for a in ["mha", "gqa8", "mqa", "mla_bf16", "mla_fp8"]:
        r = rows.get(f"cache_bytes/{a}/v3")
        if r:
            ax2.plot(ctx, [r[k] / 2**30 for k in keys], marker="o", label=a)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("context (tokens)")
    ax2.set_ylabel("GiB for one sequence, all 61 layers")
    ax2.set_title("DeepSeek-V3: whole-model cache")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_decode(rows, out):
    series = defaultdict(list)
    for name, r in rows.items():
        parts = name.split("/")
        if parts[0] != "decode" or len(parts) != 5:
            continue
        _, path, preset, cache, ctx = parts
        series[(preset, path, cache)].append((int(ctx), r["step_ms"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, preset in zip(axes, ["v2lite", "v3"]):
        for (p, path, cache), pts in sorted(series.items()):
            if p != preset:
                continue
            pts.sort()
            ax.plot([c for c, _ in pts], [t for _, t in pts], marker="o", label=f"{path} {cache}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode step attention (ms), 2 threads")
        ax.set_title(f"{preset}")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def table(context, rows):
    print(f"FP32 FMA peak measured in the run: {float(context.get('fma_peak_gflops', 0)):.0f} GFLOP/s, "
          f"read bandwidth {float(context.get('read_gbs', 0)):.1f} GB/s")
    print()
    print("| benchmark | step (ms) | GFLOP/s | of peak | of roofline |")
    print("|---|---:|---:|---:|---:|")
    for name, r in sorted(rows.items()):
        if name.startswith("decode/absorbed/") or name.startswith("prefill/"):
            print(f"| {name} | {r['step_ms']:.3g} | {r['GFLOP/s']:.0f} | {r['peak_fraction']:.0%} "
                  f"| {r['roofline_fraction']:.0%} |")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    context, rows = load(sys.argv[1])
    out = sys.argv[2].rstrip("/")
    plot_cache(rows, f"{out}/cache_size.png")
    plot_decode(rows, f"{out}/decode_speed.png")
    table(context, rows)


if __name__ == "__main__":
    main()
