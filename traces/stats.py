"""Routing statistics of a trace: the skew and locality numbers that decide how well an expert
cache and a predictor can do, computed in one streaming pass over the requests.

* expert frequency per layer (heatmap) and routing entropy per layer (bits, beside log2 E);
* concentration: share of accesses covered by the top-n experts of a layer, globally versus
  within each request (the request-level skew MoE-Beyond and the pre-attention paper report);
* reuse distance: tokens between consecutive uses of the same expert at the same layer inside
  a request (the distribution an LRU-like cache lives on);
* co-activation of consecutive recorded layers j -> j+1: mutual information between the expert
  chosen at j and at j+1, and the best conditional probability P(f at j+1 | e at j) against
  the best marginal P(f) (how much a cross-layer predictor can gain).

Rows missing from a partial trace (``-1``) are skipped. Layer pairs are consecutive entries of
``moe_layers``; in a partial trace they may not be adjacent model layers (labels say which).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moesim.traces.trace import RequestRouting, TraceMeta

MAX_DISTANCE = 1024  # reuse distances above this are pooled in one overflow bin


@dataclass
class TraceStats:
    """Accumulated counts (all int64) for one trace."""

    meta: TraceMeta
    requests: int = 0
    tokens: int = 0
    rows: int = 0
    freq: np.ndarray = field(init=False)  # [L, E] accesses
    within_cum: np.ndarray = field(init=False)  # [L, E] sum over requests of top-n coverage
    within_entropy: np.ndarray = field(init=False)  # [L] access-weighted sum of entropies
    reuse: np.ndarray = field(init=False)  # [L, MAX_DISTANCE + 2] reuse-distance histogram
    first_use: np.ndarray = field(init=False)  # [L] accesses with no earlier use in the request
    co: np.ndarray = field(init=False)  # [L-1, E, E] pairs (e at j, f at j+1)
    co_tokens: np.ndarray = field(init=False)  # [L-1] tokens with both rows recorded

    def __post_init__(self) -> None:
        n_l, n_e = self.meta.num_moe_layers, self.meta.num_experts
        self.freq = np.zeros((n_l, n_e), dtype=np.int64)
        self.within_cum = np.zeros((n_l, n_e), dtype=np.int64)
        self.within_entropy = np.zeros(n_l, dtype=np.float64)
        self.reuse = np.zeros((n_l, MAX_DISTANCE + 2), dtype=np.int64)
        self.first_use = np.zeros(n_l, dtype=np.int64)
        self.co = np.zeros((max(n_l - 1, 0), n_e, n_e), dtype=np.int64)
        self.co_tokens = np.zeros(max(n_l - 1, 0), dtype=np.int64)

    def add(self, req: RequestRouting) -> None:
        ex = req.experts.astype(np.int64)
        n_tok, n_l, k = ex.shape
        n_e = self.meta.num_experts
        valid = ex[:, :, 0] >= 0  # [T, L]
        self.requests += 1
        self.tokens += n_tok
        self.rows += int(valid.sum())

        t_idx, j_idx = np.nonzero(valid)
        e = ex[t_idx, j_idx]  # [n, k]
        j_rep = np.repeat(j_idx, k)
        t_rep = np.repeat(t_idx, k)
        e_flat = e.reshape(-1)
        counts = np.bincount(j_rep * n_e + e_flat, minlength=n_l * n_e).reshape(n_l, n_e)
        self.freq += counts
        srt = -np.sort(-counts, axis=1)
        self.within_cum += np.cumsum(srt, axis=1)
        tot = counts.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.where(tot > 0, counts / np.maximum(tot, 1), 0.0)
            h = -np.sum(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0), axis=1)
        self.within_entropy += h * tot[:, 0]

        # reuse distance: sort accesses by (layer, expert, token)
        key = (j_rep * n_e + e_flat) * (n_tok + 1) + t_rep
        order = np.argsort(key, kind="stable")
        ks = key[order]
        group = ks // (n_tok + 1)
        tok = ks % (n_tok + 1)
        same = np.zeros(len(ks), dtype=bool)
        same[1:] = group[1:] == group[:-1]
        dist = np.zeros(len(ks), dtype=np.int64)
        dist[1:] = tok[1:] - tok[:-1]
        layer_of = group // n_e
        self.first_use += np.bincount(layer_of[~same], minlength=n_l)
        d = np.minimum(dist[same], MAX_DISTANCE + 1)
        self.reuse += np.bincount(
            layer_of[same] * (MAX_DISTANCE + 2) + d, minlength=n_l * (MAX_DISTANCE + 2)
        ).reshape(n_l, MAX_DISTANCE + 2)

        # co-activation of consecutive layers
        if n_l > 1:
            both = valid[:, :-1] & valid[:, 1:]  # [T, L-1]
            tt, jj = np.nonzero(both)
            a = ex[tt, jj]  # [m, k]
            b = ex[tt, jj + 1]
            idx = (jj[:, None, None] * n_e + a[:, :, None]) * n_e + b[:, None, :]
            self.co += np.bincount(idx.reshape(-1), minlength=(n_l - 1) * n_e * n_e).reshape(
                n_l - 1, n_e, n_e
            )
            self.co_tokens += np.bincount(jj, minlength=n_l - 1)


def collect(meta: TraceMeta, requests: Iterable[RequestRouting]) -> TraceStats:
    st = TraceStats(meta)
    for req in requests:
        st.add(req)
    return st


def _entropy_bits(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return float("nan")
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def tables(st: TraceStats) -> dict[str, pd.DataFrame]:
    """The statistics as tidy tables (one row per layer, layer x expert, ...)."""
    meta = st.meta
    layers = np.asarray(meta.moe_layers)
    n_e, k = meta.num_experts, meta.top_k
    tot = st.freq.sum(axis=1)
    safe = np.maximum(tot, 1)
    glob_cum = np.cumsum(-np.sort(-st.freq, axis=1), axis=1) / safe[:, None]
    within = st.within_cum / safe[:, None]
    reuses = st.reuse.sum(axis=1)
    cdf = np.cumsum(st.reuse, axis=1) / np.maximum(reuses, 1)[:, None]
    median = np.array(
        [int(np.searchsorted(c, 0.5)) if r else -1 for c, r in zip(cdf, reuses, strict=True)]
    )

    per_layer: dict[str, Any] = {
        "layer": layers,
        "accesses": tot,
        "entropy_bits": [_entropy_bits(c) for c in st.freq],
        "max_entropy_bits": np.full(len(layers), np.log2(n_e)),
        "within_request_entropy_bits": st.within_entropy / safe,
        "experts_used": (st.freq > 0).sum(axis=1),
        "reuse_fraction": reuses / safe,
        "reuse_distance_median": median,
    }
    for n in sorted({1, k, 2 * k, max(1, n_e // 4)}):
        if n <= n_e:
            per_layer[f"top{n}_share_global"] = glob_cum[:, n - 1]
            per_layer[f"top{n}_share_within_request"] = within[:, n - 1]
    stats = pd.DataFrame(per_layer)

    freq = pd.DataFrame(
        {
            "layer": np.repeat(layers, n_e),
            "expert": np.tile(np.arange(n_e), len(layers)),
            "count": st.freq.reshape(-1),
            "share": (st.freq / safe[:, None]).reshape(-1),
        }
    )
    conc = pd.DataFrame(
        {
            "layer": np.repeat(layers, n_e),
            "n": np.tile(np.arange(1, n_e + 1), len(layers)),
            "global_share": glob_cum.reshape(-1),
            "within_request_share": within.reshape(-1),
        }
    )
    dists = np.arange(1, MAX_DISTANCE + 2)
    reuse = pd.DataFrame(
        {
            "layer": np.repeat(layers, len(dists)),
            "distance": np.tile(dists, len(layers)),  # MAX_DISTANCE + 1 = "more than MAX"
            "count": st.reuse[:, 1:].reshape(-1),
            "cdf": cdf[:, 1:].reshape(-1),
        }
    )
    co_rows = []
    for j in range(len(st.co)):
        c = st.co[j].astype(np.float64)
        pairs = c.sum()
        if pairs == 0:
            continue
        p = c / pairs
        px, py = p.sum(axis=1), p.sum(axis=0)
        nz = p > 0
        mi = float((p[nz] * np.log2(p[nz] / np.outer(px, py)[nz])).sum())
        hx, hy = _entropy_bits(c.sum(axis=1)), _entropy_bits(c.sum(axis=0))
        n_tok = st.co_tokens[j]
        # P(f at j+1 | e at j) = tokens with both / tokens with e (ids distinct within a row)
        with_e = c.sum(axis=1) / k
        cond = np.divide(c, with_e[:, None], out=np.zeros_like(c), where=with_e[:, None] > 0)
        top1_cond = float((with_e * cond.max(axis=1)).sum() / max(with_e.sum(), 1))
        baseline = float(c.sum(axis=0).max() / k / max(n_tok, 1))
        co_rows.append(
            {
                "layer_from": int(layers[j]),
                "layer_to": int(layers[j + 1]),
                "tokens": int(n_tok),
                "mi_bits": mi,
                "nmi": mi / min(hx, hy) if min(hx, hy) > 0 else float("nan"),
                "top1_cond_prob": top1_cond,
                "baseline_top1_prob": baseline,
            }
        )
    co = pd.DataFrame(
        co_rows,
        columns=[
            "layer_from",
            "layer_to",
            "tokens",
            "mi_bits",
            "nmi",
            "top1_cond_prob",
            "baseline_top1_prob",
        ],
    )
    return {
        "stats": stats,
        "stats_expert_freq": freq,
        "stats_concentration": conc,
        "stats_reuse": reuse,
        "stats_coactivation": co,
    }


def _save(fig: Any, out: Path, name: str) -> list[Path]:
    from moesim.experiments.plot_style import savefig  # TrueType fonts in the PDF

    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        savefig(fig, p, dpi=150 if p.suffix == ".png" else None, bbox_inches="tight")
    return paths


def plots(st: TraceStats, tabs: dict[str, pd.DataFrame], out: Path) -> list[Path]:
    """PNG + PDF figures; uses the object API (no pyplot global state)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    meta = st.meta
    layers = list(meta.moe_layers)
    n_l, n_e, k = len(layers), meta.num_experts, meta.top_k
    title = f"{meta.model}: {st.requests} requests, {st.tokens} tokens"
    written: list[Path] = []
    safe = np.maximum(st.freq.sum(axis=1, keepdims=True), 1)

    fig = Figure(figsize=(min(16, 4 + n_e * 0.08), 1.5 + 0.22 * n_l))
    ax = fig.add_subplot()
    im = ax.imshow(st.freq / safe, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert id")
    ax.set_ylabel("MoE layer id")
    ax.set_yticks(range(n_l))
    ax.set_yticklabels([str(x) for x in layers], fontsize=6 if n_l > 20 else 8)
    ax.set_title(f"{title}\nexpert share of accesses per layer")
    fig.colorbar(im, ax=ax, label="share of the layer's accesses")
    written += _save(fig, out, "expert_freq_heatmap")

    conc = tabs["stats_concentration"]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    n = np.arange(1, n_e + 1)
    for col, label, color in (
        ("global_share", "global (whole trace)", "tab:blue"),
        ("within_request_share", "within each request", "tab:orange"),
    ):
        grid = conc[col].to_numpy().reshape(n_l, n_e)
        ax.plot(n, grid.mean(axis=0), color=color, label=f"{label}, mean over layers")
        ax.fill_between(n, grid.min(axis=0), grid.max(axis=0), color=color, alpha=0.2)
    ax.plot(n, n / n_e, color="grey", ls=":", label="uniform")
    ax.axvline(k, color="black", ls="--", lw=0.8, label=f"top-k = {k}")
    ax.set_xscale("log")
    ax.set_xlabel("n (top-n experts of the layer; log scale)")
    ax.set_ylabel("share of accesses covered")
    ax.set_ylim(0, 1.01)
    ax.set_title(f"{title}\nconcentration (band = min..max over layers)", fontsize=9)
    ax.legend(fontsize=7)
    written += _save(fig, out, "concentration")

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    reuses = st.reuse.sum(axis=1)
    cmap = colormaps["viridis"]
    d = np.arange(1, MAX_DISTANCE + 2)
    for j in range(n_l):
        if reuses[j]:
            cdf = np.cumsum(st.reuse[j, 1:]) / reuses[j]
            ax.step(
                d,
                cdf,
                where="post",
                color=cmap(j / max(n_l - 1, 1)),
                lw=0.8,
                label=f"layer {layers[j]}" if n_l <= 8 else None,
            )
    ax.set_xscale("log")
    ax.set_xlabel(
        f"reuse distance in tokens (same expert, layer and request; >{MAX_DISTANCE} pooled; "
        "log scale)"
    )
    ax.set_ylabel("CDF over reuses")
    ax.set_ylim(0, 1.01)
    ax.set_title(f"{title}\nreuse-distance CDF per layer (colour = layer order)", fontsize=9)
    if n_l <= 8:
        ax.legend(fontsize=7)
    written += _save(fig, out, "reuse_distance_cdf")

    co = tabs["stats_coactivation"]
    fig = Figure(figsize=(7, 5))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    if len(co):
        x = np.arange(len(co))
        ax1.bar(x, co["mi_bits"], color="tab:purple")
        ax1.set_ylabel("MI (bits)")
        ax2.plot(x, co["top1_cond_prob"], "o-", label="max_f P(f at j+1 | e at j), avg over e")
        ax2.plot(x, co["baseline_top1_prob"], "s--", label="max_f P(f at j+1) (no context)")
        ax2.set_ylabel("probability")
        ax2.legend(fontsize=7)
        labels = [f"{a}->{b}" for a, b in zip(co["layer_from"], co["layer_to"], strict=True)]
        ax2.set_xticks(x)
        ax2.set_xticklabels(labels, rotation=90, fontsize=6 if len(x) > 20 else 8)
        ax2.set_xlabel("layer transition")
    else:
        ax1.text(
            0.5,
            0.5,
            "needs at least two recorded layers",
            ha="center",
            va="center",
            transform=ax1.transAxes,
        )
    ax1.set_title(f"{title}\nco-activation of consecutive recorded layers", fontsize=9)
    written += _save(fig, out, "coactivation")

    stats = tabs["stats"]
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    x = np.arange(n_l)
    ax.bar(x, stats["entropy_bits"], color="tab:green", label="global")
    ax.plot(x, stats["within_request_entropy_bits"], "k.", label="within request (weighted)")
    ax.axhline(np.log2(n_e), color="red", ls="--", label=f"max log2 E = {np.log2(n_e):.2f}")
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in layers], fontsize=6 if n_l > 20 else 8)
    ax.set_xlabel("MoE layer id")
    ax.set_ylabel("routing entropy (bits)")
    ax.set_title(f"{title}\nrouting entropy per layer", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    written += _save(fig, out, "routing_entropy")
    return written


def write_stats(
    meta: TraceMeta, requests: Iterable[RequestRouting], out: str | Path, *, plot: bool = True
) -> dict[str, Path]:
    """Compute, then write ``stats*.parquet``, ``summary.json`` and the figures into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st = collect(meta, requests)
    tabs = tables(st)
    written: dict[str, Path] = {}
    for name, df in tabs.items():
        p = out / f"{name}.parquet"
        df.to_parquet(p, index=False)
        written[name] = p
    stats = tabs["stats"]
    summary = {
        "model": meta.model,
        "requests": st.requests,
        "tokens": st.tokens,
        "rows": st.rows,
        "moe_layers": list(meta.moe_layers),
        "num_experts": meta.num_experts,
        "top_k": meta.top_k,
        "partial": meta.partial,
        "mean_entropy_bits": float(np.nanmean(stats["entropy_bits"])),
        "max_entropy_bits": float(np.log2(meta.num_experts)),
        "mean_reuse_fraction": float(stats["reuse_fraction"].mean()),
    }
    k = meta.top_k
    if f"top{k}_share_global" in stats:
        summary[f"mean_top{k}_share_global"] = float(stats[f"top{k}_share_global"].mean())
        summary[f"mean_top{k}_share_within_request"] = float(
            stats[f"top{k}_share_within_request"].mean()
        )
    co = tabs["stats_coactivation"]
    if len(co):
        summary["mean_mi_bits"] = float(co["mi_bits"].mean())
    p = out / "summary.json"
    p.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    written["summary"] = p
    if plot:
        for f in plots(st, tabs, out):
            written[f.name] = f
    return written
