#!/usr/bin/python3
"""Plots convert_mha's JSON (--json OUT): relative error of the attention output against cache
bytes per token, MLA (latent rank r) against GQA (mean-pooled KV heads).

    scripts/plot_convert.py build/release/convert.json docs/

writes docs/convert_error.png and prints the rows as a Markdown table.
Needs Debian's python3-matplotlib (./run.sh convert installs it).
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        rows = json.load(f)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, style, label in (("mla", "o-", "MLA (joint low-rank K/V latent)"),
                                 ("gqa", "s--", "GQA (mean-pooled KV heads)")):
        pts = sorted((r["cache_bytes_per_token"], r["rel_error"]) for r in rows
                     if r["method"] == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("cache bytes per token and layer (FP32)")
    ax.set_ylabel("relative error of the attention output")
    ax.set_title("MHA converted to MLA vs GQA at equal cache size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = os.path.join(sys.argv[2], "convert_error.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}\n")
    print("| method | rank | groups | bytes/token | rel. error |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        rank = r["rank"] if r["rank"] is not None else "-"
        groups = r["groups"] if r["groups"] is not None else "-"
        print(f"| {r['method']} | {rank} | {groups} | {r['cache_bytes_per_token']} | "
              f"{r['rel_error']:.2e} |")


if __name__ == "__main__":
    main()
