#!/usr/bin/python3
"""Plots convert_mha's JSON (--json OUT): relative error of the attention output against cache
bytes per token, MLA (latent rank r) against GQA (mean-pooled KV heads).

    scripts/plot_convert.py build/release/convert.json docs/

writes docs/convert_error.png (all rotary dimensions kept, the shortest context) and, when the
JSON holds several rope_keep values or contexts (--rope-keep, --context), docs/partial_rope.png:
error against cache bytes for each rope_keep, one panel per context, against GQA. Prints the
rows as a Markdown table.
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
        all_rows = json.load(f)
    contexts = sorted({r.get("context", 0) for r in all_rows})
    keeps = sorted({r["rope_keep"] for r in all_rows if r.get("rope_keep") is not None},
                   reverse=True)
    rows = [r for r in all_rows if r.get("context", 0) == contexts[0] and
            (r["method"] == "gqa" or r.get("rope_keep", keeps[0] if keeps else None) == keeps[0])]
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
    if len(contexts) > 1 or len(keeps) > 1:
        fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4.5), sharey=True,
                                 squeeze=False)
        for ax, ctx in zip(axes[0], contexts):
            at = [r for r in all_rows if r.get("context", 0) == ctx]
            for keep in keeps:
                pts = sorted((r["cache_bytes_per_token"], r["rel_error"]) for r in at
                             if r["method"] == "mla" and r["rope_keep"] == keep)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3,
                        label=f"MLA, rope_keep {keep}")
            pts = sorted((r["cache_bytes_per_token"], r["rel_error"]) for r in at
                         if r["method"] == "gqa")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--", color="gray", label="GQA")
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_title(f"context {ctx} tokens")
            ax.set_xlabel("cache bytes per token and layer (FP32)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel("relative error of the attention output")
        axes[0][-1].legend(fontsize=8)
        fig.suptitle("Partial RoPE: rotary dimensions kept vs moved into the latent")
        fig.tight_layout()
        out = os.path.join(sys.argv[2], "partial_rope.png")
        fig.savefig(out, dpi=110)
        print(f"wrote {out}\n")
    print("| method | rank | groups | rope_keep | context | bytes/token | rel. error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in all_rows:
        rank = r["rank"] if r["rank"] is not None else "-"
        groups = r["groups"] if r["groups"] is not None else "-"
        keep = r.get("rope_keep") if r.get("rope_keep") is not None else "-"
        print(f"| {r['method']} | {rank} | {groups} | {keep} | {r.get('context', '-')} | "
              f"{r['cache_bytes_per_token']} | {r['rel_error']:.2e} |")


if __name__ == "__main__":
    main()
