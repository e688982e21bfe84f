"""The "Modern models" experiment: locality, hit rate vs capacity and timed stall of the
2025-26 real traces (Qwen3-30B-A3B, Gemma-4-26B-A4B, GPT-OSS-120B, Qwen3.6-35B-A3B, all-layer
Qwen1.5-MoE) next to DeepSeek-V2-Lite and Mixtral.

    python -m moesim.experiments.modern_models          # CSVs + figures (about 2 min)

writes ``experiments/docs/results/modern_models_{locality,capacity,stall}.csv`` and
``experiments/figures/modern_models_{capacity,locality}.png``; the tables on the docs page are
rendered from the CSVs by :mod:`moesim.experiments.readme_blocks`. The residency check is
:mod:`moesim.traces.residency` (its own CSV).

Why the replay differs per trace: the new traces record a real prefill and decode, so the prompt
is one prefill step (as llama.cpp / MLX ran it) and every generated token one decode step
(``replay=prefill``); DeepSeek-V2-Lite's trace is one prefill pass per prompt, replayed
token by token as a teacher-forced decode (``replay=decode``), as on the other pages.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parent / "docs" / "results"
FIGURES = Path(__file__).resolve().parent / "figures"


@dataclass(frozen=True)
class Model:
    trace: str  # experiments/conf/trace/<name>.yaml
    label: str
    replay: str  # "prefill": prompt as one step, then decode; "decode": teacher-forced
    max_requests: int | None = None
    bits: float | None = None  # bits per weight the trace ran with, where the card is bf16


MODELS = (
    Model("qwen3_30b_a3b_bmoe", "Qwen3-30B-A3B (Q4_K_M, top-6)", "prefill"),
    Model("gemma4_26b_a4b_bmoe", "Gemma-4-26B-A4B (Q4_K_M, top-6)", "prefill"),
    Model("gpt_oss_120b_bmoe", "GPT-OSS-120B (MXFP4, top-2)", "prefill"),
    Model("qwen36_35b_a3b", "Qwen3.6-35B-A3B (MLX 4-bit)", "prefill"),
    # the qwen15_moe_a27b card is the bf16 model; the trace ran MLX 4-bit (group 64: 4.5 bits)
    Model("qwen15_moe_all_layers", "Qwen1.5-MoE-A2.7B (MLX 4-bit, 24 layers)", "prefill",
          bits=4.5),
    Model("deepseek_v2_lite_test", "DeepSeek-V2-Lite (bf16)", "decode"),
    Model("mixtral_8x7b", "Mixtral-8x7B (bf16)", "prefill"),
)
FRACTIONS = (0.05, 0.1, 0.25, 0.5)
POLICIES = ("lru", "belady")
HW = ("oneplus_15r", "rtx4090")
STALL_MIB = 4000  # the expert cache BigMoeOnEdge ran Qwen3 and Gemma-4 with, on both devices


def locality(m: Model) -> dict[str, object]:
    """One row of locality figures for a trace (traces.stats over every request)."""
    from moesim.experiments.api import load_trace
    from moesim.traces.stats import collect, tables

    tr = load_trace(m.trace, max_requests=m.max_requests)
    st = collect(tr.meta, tr.requests)
    tab = tables(st)
    s, co = tab["stats"], tab["stats_coactivation"]
    k, n_e = tr.meta.top_k, tr.meta.num_experts
    phases = np.concatenate([r.phase for r in tr.requests])
    top2k = f"top{2 * k}_share_global" if 2 * k <= n_e else f"top{n_e}_share_global"
    return {
        "trace": m.trace, "model": m.label, "card": tr.meta.model,
        "prompts": len(tr.requests), "prefill_tokens": int((phases == 0).sum()),
        "decode_tokens": int((phases == 1).sum()), "layers": tr.meta.num_moe_layers,
        "experts": n_e, "top_k": k,
        "reuse_fraction": float(s["reuse_fraction"].mean()),
        "reuse_distance_median": float(np.median(s["reuse_distance_median"])),
        "entropy_ratio": float((s["entropy_bits"] / s["max_entropy_bits"]).mean()),
        "top2k_share": float(s[top2k].mean()),
        "top2k_share_min_layer": float(s[top2k].min()),
        "top2k_share_max_layer": float(s[top2k].max()),
        "cross_layer_top1_cond": float(co["top1_cond_prob"].mean()),
        "cross_layer_baseline": float(co["baseline_top1_prob"].mean()),
        "cross_layer_nmi": float(co["nmi"].mean()),
    }


def _run(m: Model, **kw: object) -> pd.DataFrame:
    from moesim.experiments.api import simulate

    if m.bits is not None:
        kw["weights"] = {"experts_bits": m.bits, "attention_bits": m.bits,
                         "shared_bits": m.bits}
    return simulate(trace=m.trace, replay=m.replay, max_requests=m.max_requests, **kw)


def capacity_rows(m: Model) -> list[dict[str, object]]:
    rows = []
    for policy in POLICIES:
        for frac in FRACTIONS:
            df = _run(m, policy=policy, cache=frac, mode="zero_latency")
            rows.append({"trace": m.trace, "model": m.label, "policy": policy,
                         "fraction": frac, "slots": int(df["cache.slots"].iloc[0]),
                         "hit_rate": float(df["hit_rate"].iloc[0])})
    return rows


def stall_rows(m: Model) -> list[dict[str, object]]:
    rows = []
    for hw in HW:
        df = _run(m, policy="lru", cache={"mib": STALL_MIB}, hw=hw)
        r = df.iloc[0]
        rows.append({
            "trace": m.trace, "model": m.label, "hw": hw, "cache_mib": STALL_MIB,
            "expert_mib": float(r["expert_bytes"]) / 2**20, "slots": int(r["cache.slots"]),
            "fraction": float(r["cache.capacity_fraction"]),
            "hit_rate": float(r["hit_rate"]),
            "time_per_token_ms": float(r["time_per_output_token_s"]) * 1e3,
            "stall_per_token_ms": float(r["stall_per_output_token_s"]) * 1e3,
        })
    return rows


def figures(loc: pd.DataFrame, cap: pd.DataFrame, out: Path = FIGURES) -> list[Path]:
    """Hit rate vs capacity (LRU and Belady) and the locality summary, as PNG."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moesim.experiments.plot_style import savefig

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colors = plt.get_cmap("tab10")
    for i, (_trace, g) in enumerate(cap.groupby("trace", sort=False)):
        for policy, style in (("lru", "-"), ("belady", ":")):
            h = g[g["policy"] == policy].sort_values("fraction")
            ax.plot(h["fraction"] * 100, h["hit_rate"] * 100, style, marker="o", ms=3,
                    color=colors(i), label=g["model"].iloc[0] if policy == "lru" else None)
    ax.set_xscale("log")
    ax.set_xticks([f * 100 for f in FRACTIONS], [f"{f:.0%}" for f in FRACTIONS])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("cache capacity (share of all routed experts)")
    ax.set_ylabel("hit rate (%)")
    ax.set_title("LRU (solid) and Belady (dotted), zero-latency replay")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    p1 = out / "modern_models_capacity.png"
    savefig(fig, p1, dpi=130)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    y = np.arange(len(loc))
    labels = [m.split(" (")[0] for m in loc["model"]]
    axes[0].barh(y, loc["reuse_fraction"] * 100, color="tab:blue")
    axes[0].set_xlabel("accesses reusing an expert\nseen earlier in the request (%)")
    err = np.vstack([loc["top2k_share"] - loc["top2k_share_min_layer"],
                     loc["top2k_share_max_layer"] - loc["top2k_share"]]) * 100
    axes[1].barh(y, loc["top2k_share"] * 100, xerr=err, color="tab:orange")
    axes[1].set_xlabel("share of a layer's accesses to its\n2k most used experts (%, range)")
    axes[2].barh(y - 0.2, loc["cross_layer_top1_cond"] * 100, height=0.4, color="tab:green",
                 label="given layer l's expert")
    axes[2].barh(y + 0.2, loc["cross_layer_baseline"] * 100, height=0.4, color="tab:gray",
                 label="most popular expert")
    axes[2].set_xlabel("P(best guess of layer l+1's\nexperts is right) (%)")
    axes[2].legend(fontsize=7)
    for a in axes:
        a.set_yticks(y, labels if a is axes[0] else [""] * len(y), fontsize=8)
        a.invert_yaxis()
        a.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    p2 = out / "modern_models_locality.png"
    savefig(fig, p2, dpi=130)
    plt.close(fig)
    return [p1, p2]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--figures", type=Path, default=FIGURES)
    ap.add_argument("--only", nargs="*", help="trace names (default: all)")
    ap.add_argument("--figures-only", action="store_true",
                    help="redraw the figures from the committed CSVs")
    args = ap.parse_args(argv)
    if args.figures_only:
        for p in figures(pd.read_csv(args.out / "modern_models_locality.csv"),
                         pd.read_csv(args.out / "modern_models_capacity.csv"), args.figures):
            print(f"wrote {p}")
        return 0
    models = [m for m in MODELS if not args.only or m.trace in args.only]
    from moesim.experiments.api import InputError
    from moesim.traces import TraceError

    try:
        loc = pd.DataFrame([locality(m) for m in models])
        cap = pd.DataFrame([r for m in models for r in capacity_rows(m)])
        stall = pd.DataFrame([r for m in models for r in stall_rows(m)])
    except (InputError, TraceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name, df in (("locality", loc), ("capacity", cap), ("stall", stall)):
        path = args.out / f"modern_models_{name}.csv"
        df.to_csv(path, index=False, float_format="%.6g")
        print(f"wrote {path}")
    for p in figures(loc, cap, args.figures):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --- the docs page's tables (registered in readme_blocks.BLOCKS) ------------------------------


def _pc(x: float) -> str:
    return f"{100 * x:.1f} %"


def _load(name: str) -> pd.DataFrame:
    return pd.read_csv(RESULTS / f"modern_models_{name}.csv")


def render_residency(df: pd.DataFrame) -> str:
    lines = [
        "From `experiments/docs/results/modern_models_residency.csv` "
        "(`python -m moesim.traces.residency --out experiments/docs/results/"
        "modern_models_residency.csv`). Accesses are trace rows (one routed expert of one token "
        "at one layer); the engine hit when it read nothing.",
        "",
        "| trace | cache | moesim slots | accesses (prefill) | engine hit rate | moesim hit rate "
        "| moesim per lookup | agreement (decode) | disagree prefill / decode | engine-rule model "
        "| flips: bytes→slots / prefill order / rest | import |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in df.itertuples():
        lines.append(
            f"| `{r.trace}` | {r.cache_mib:.0f} MiB | {r.moesim_slots:,} | {r.accesses:,} "
            f"({r.prefill_accesses:,}) | {_pc(r.engine_hit_rate)} | {_pc(r.moesim_hit_rate)} "
            f"| {_pc(r.moesim_lookup_hit_rate)} "
            f"| {100 * r.agreement:.2f} % ({100 * r.agree_decode:.2f} %) "
            f"| {r.disagree_prefill} / {r.disagree_decode} "
            f"| {100 * r.engine_rules_agreement:.2f} % | {r.flips_byte_vs_slot} / "
            f"{r.flips_prefill_order} / {r.flips_rest} | {r.import_s:.2f} s |")
    return "\n".join(lines) + "\n"


def render_locality(df: pd.DataFrame) -> str:
    lines = [
        "From `experiments/docs/results/modern_models_locality.csv` (`python -m "
        "moesim.experiments.modern_models`); every figure is a mean over layers.",
        "",
        "| model | prompts | prefill / decode tokens | layers × experts, top-k | reuse | median "
        "reuse distance | entropy / max | top-2k share (layer min-max) | next layer: best guess "
        "given layer l / most popular |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in df.itertuples():
        lines.append(
            f"| {r.model} | {r.prompts} | {r.prefill_tokens:,} / {r.decode_tokens:,} "
            f"| {r.layers} × {r.experts}, {r.top_k} | {_pc(r.reuse_fraction)} "
            f"| {r.reuse_distance_median:g} | {r.entropy_ratio:.2f} | {_pc(r.top2k_share)} "
            f"({_pc(r.top2k_share_min_layer)}-{_pc(r.top2k_share_max_layer)}) "
            f"| {_pc(r.cross_layer_top1_cond)} / {_pc(r.cross_layer_baseline)} |")
    return "\n".join(lines) + "\n"


def render_capacity(df: pd.DataFrame) -> str:
    fr = sorted(df["fraction"].unique())
    lines = [
        "From `experiments/docs/results/modern_models_capacity.csv`. Each cell: hit rate LRU / "
        "Belady, zero-latency, the computing layer pinned.",
        "",
        "| model | " + " | ".join(f"{f:.0%}" for f in fr) + " |",
        "|---|" + "---|" * len(fr),
    ]
    for _trace, g in df.groupby("trace", sort=False):
        cells = []
        for f in fr:
            h = g[g["fraction"] == f].set_index("policy")["hit_rate"]
            cells.append(f"{_pc(h['lru'])} / {_pc(h['belady'])}")
        lines.append(f"| {g['model'].iloc[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_stall(df: pd.DataFrame) -> str:
    lines = [
        "From `experiments/docs/results/modern_models_stall.csv`. LRU, a 4000 MiB expert cache "
        "on both devices; time and stall per output token (ms; the prompt's step included).",
        "",
        "| model | expert | slots (share) | hit rate | oneplus_15r: time / stall | rtx4090: "
        "time / stall |",
        "|---|---|---|---|---|---|",
    ]
    for _trace, g in df.groupby("trace", sort=False):
        by = g.set_index("hw")
        a, b = by.loc["oneplus_15r"], by.loc["rtx4090"]
        lines.append(
            f"| {a['model']} | {a['expert_mib']:.2f} MiB | {int(a['slots']):,} "
            f"({_pc(a['fraction'])}) | {_pc(a['hit_rate'])} | {a['time_per_token_ms']:.1f} / "
            f"{a['stall_per_token_ms']:.1f} | {b['time_per_token_ms']:.1f} / "
            f"{b['stall_per_token_ms']:.1f} |")
    return "\n".join(lines) + "\n"


# name -> (load, render, figure); readme_blocks merges these into its BLOCKS
BLOCKS = {
    "modern_models_residency": (lambda: _load("residency"), render_residency, None),
    "modern_models_locality": (lambda: _load("locality"), render_locality, None),
    "modern_models_capacity": (lambda: _load("capacity"), render_capacity, None),
    "modern_models_stall": (lambda: _load("stall"), render_stall, None),
}
