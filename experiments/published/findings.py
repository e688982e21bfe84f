"""Do the timed findings hold under a calibrated runtime? The same questions as the experiment
pages (does the cache matter, does a perfect prediction's timing matter), asked on the
mixtral-offloading setups twice: with the hardware roofline alone (``runtime=none``, what the
experiment pages use) and with the fitted ``hqq_offload`` runtime.

    python -m moesim.experiments.published.findings   # writes published_findings.csv

Every run is the published predictor's mapping of a Table 2 cell (2-bit experts, 4 experts
per layer), with the policy replaced: LRU alone, no cache, and a perfect next-layer prediction
issued at the pre-attention point (lookahead 1) or behind the demand copies (lookahead 0).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import pandas as pd

from moesim.hw_profiles.runtime import load_runtime

from .entries import load_entries
from .predict import prepare, run_prepared
from .report import RESULTS

CSV = RESULTS / "published_findings.csv"
CELLS = ("mo_t2_a100_2bit_nopre", "mo_t2_m3080_2bit_nopre", "mo_t2_t4_2bit_nopre")
RUNTIMES = ("none", "hqq_offload")
VARIANTS: dict[str, dict] = {
    "no cache": {"name": "lru"},
    "lru": {"name": "lru"},
    "perfect, pre-attention, d=1": {"name": "oracle_prefetch", "point": "pre_attention",
                                    "lookahead": 1},
    "perfect, behind demand, d=0": {"name": "oracle_prefetch", "point": "demand_issued",
                                    "lookahead": 0},
}


def run() -> pd.DataFrame:
    entries = {e.id: e for e in load_entries()}
    rows = []
    for cell in CELLS:
        base = prepare(entries[cell])
        no_cache = prepare(replace(entries[cell], cache={"none": True}))
        for rt_name in RUNTIMES:
            rt = load_runtime(rt_name)
            for label, policy in VARIANTS.items():
                p = no_cache if label == "no cache" else base
                s = run_prepared(p, rt, policy)
                rows.append({"cell": cell, "hw": p.entry.hw, "runtime": rt_name,
                             "variant": label, "time_per_output_token_s":
                             s["time_per_output_token_s"], "stall_per_output_token_s":
                             s["stall_per_output_token_s"], "hit_rate": s["hit_rate"]})
    return pd.DataFrame(rows)


def gains(df: pd.DataFrame) -> pd.DataFrame:
    """Per setup and runtime: the cache's gain (no cache / LRU) and a perfect prediction's
    (LRU / the better of its two issue points)."""
    t = df.pivot_table(index=["hw", "runtime"], columns="variant",
                       values="time_per_output_token_s", sort=False)
    best = t[["perfect, pre-attention, d=1", "perfect, behind demand, d=0"]].min(axis=1)
    return pd.DataFrame({"cache_gain": t["no cache"] / t["lru"], "perfect_gain": t["lru"] / best})


def summary(df: pd.DataFrame) -> str:
    """The finding in one generated sentence: the ranges per runtime."""
    g = gains(df)

    def span(col: str, rt: str) -> str:
        v = g.xs(rt, level="runtime")[col]
        return f"{v.min():.2f}-{v.max():.2f}x"

    return (f"With the roofline alone (`runtime=none`) the LRU cache makes a token "
            f"{span('cache_gain', 'none')} faster and a perfect prediction "
            f"{span('perfect_gain', 'none')}; under the fitted `hqq_offload` runtime the cache "
            f"gives {span('cache_gain', 'hqq_offload')} and a perfect prediction "
            f"{span('perfect_gain', 'hqq_offload')}.")


def render(df: pd.DataFrame) -> str:
    """Per setup and runtime: the cache's gain and how much a perfect prediction's timing
    moves the time per token."""
    lines = ["| setup | runtime | LRU vs no cache | perfect prediction vs LRU "
             "| pre-attention d=1 vs behind-demand d=0 |",
             "|---|---|---|---|---|"]
    for (hw, rt), g in df.groupby(["hw", "runtime"], sort=False):
        t = g.set_index("variant")["time_per_output_token_s"]
        best = min(t["perfect, pre-attention, d=1"], t["perfect, behind demand, d=0"])
        lines.append(
            f"| {hw} | {rt} | {t['no cache'] / t['lru']:.2f}x faster | "
            f"{t['lru'] / best:.2f}x faster | "
            f"{t['perfect, behind demand, d=0'] / t['perfect, pre-attention, d=1']:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    df = run()
    CSV.parent.mkdir(parents=True, exist_ok=True)
    tmp = CSV.with_name(f".{CSV.name}.tmp")
    df.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(CSV)
    print(render(df))
    print(f"wrote {CSV}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
