"""Cache-semantics check: moesim's LRU against the engine's own per-access residency.

The BigMoeOnEdge traces (``bmoe-route-csv``) record, for every routed expert, whether the engine
found it in its own LRU cache (``feat.read_bytes == 0``: nothing read). This module replays the
same trace through moesim's LRU sized as the engine's cache (``cache.mib``) and compares the two
per access (one trace row = one routed expert of one token at one layer).

Why there is a second, stand-alone LRU here (:func:`engine_rule_lru`): agreement alone does not
say *why* the two differ. The stand-alone model follows the engine's documented rules (a byte
budget over experts of per-layer size; a layer's misses are inserted first and the cache is
then trimmed to budget, never evicting the layer's own experts; in a batched prefill every
touched expert is re-promoted in token order, so the LRU order follows each expert's last use)
and each rule can be switched to moesim's (slots of the mean expert size; first-use order).
Walking from the engine's rules to moesim's one switch at a time counts how many accesses each
difference flips. moesim's own answer always comes from a real moesim run (``transfers.parquet``
of a timed LRU run: one demand copy per miss), never from this model.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from moesim.traces.errors import TraceError
from moesim.traces.store import load_features, load_trace, read_meta
from moesim.traces.trace import PREFILL, Trace

# trace config name -> (engine cache MiB as the run logs state it)
ENGINE_CACHE_MIB = {"qwen3_30b_a3b_bmoe": 4000, "gemma4_26b_a4b_bmoe": 4000,
                    "gpt_oss_120b_bmoe": 3000}


@dataclass(frozen=True)
class Access:
    """Every recorded routed expert in trace row order (token-major, layer, rank)."""

    unit: np.ndarray  # int64: replay step (the whole prompt is one prefill step)
    layer: np.ndarray  # int64: layer index j (0..L-1)
    expert: np.ndarray  # int64
    prefill: np.ndarray  # bool
    engine_hit: np.ndarray  # bool: the engine read nothing for it
    residency: np.ndarray  # int32: the engine's residency column as recorded


def accesses(trace: Trace, read_bytes: np.ndarray, residency: np.ndarray) -> Access:
    """Flatten a one-request trace into accesses; the prompt is one step, as the engine ran it
    (llama.cpp evaluates the whole prompt as one batch: one expert lookup per layer)."""
    if len(trace.requests) != 1:
        raise TraceError(f"expected one request, got {len(trace.requests)}", field="requests")
    req = trace.requests[0]
    ex = req.experts
    k = ex.shape[2]
    rec = ex[:, :, 0] >= 0
    t_idx, j_idx = np.nonzero(rec)  # token-major, then layer: the file's row order
    pre = req.phase[t_idx] == PREFILL
    n_pre = int((req.phase == PREFILL).sum())
    unit = np.where(pre, 0, t_idx - n_pre + (1 if n_pre else 0))
    rows = ex[t_idx, j_idx]  # [n, k]
    rep = np.repeat
    # replay order: a step's layers in turn, and inside one layer its tokens in order (the
    # engine's batch lists the ids token-major); file rows are token-major instead
    order = np.lexsort((np.arange(len(t_idx) * k), rep(t_idx, k), rep(j_idx, k), rep(unit, k)))
    return Access(
        unit=rep(unit, k)[order], layer=rep(j_idx, k)[order],
        expert=rows.reshape(-1).astype(np.int64)[order], prefill=rep(pre, k)[order],
        engine_hit=(read_bytes.reshape(-1) == 0)[order],
        residency=residency.reshape(-1).astype(np.int32)[order],
    )


def engine_rule_lru(acc: Access, layer_bytes: Sequence[int], budget: float, *,
                    unit: str = "bytes", order: str = "last_use") -> np.ndarray:
    """Per-access hits of an LRU following the engine's rules (module docstring).

    ``unit="bytes"``: the budget holds experts of their own layer's size; ``"slots"``: every
    expert counts ``mean(layer_bytes)`` (moesim's cache of whole slots). ``order="last_use"``:
    after a batched step every touched expert is promoted in token order (the engine);
    ``"first_use"``: in the order each was first touched (moesim's workload keys)."""
    size = np.asarray(layer_bytes, dtype=np.float64)
    if unit == "slots":
        size = np.full_like(size, size.mean())
    lru: OrderedDict[tuple[int, int], None] = OrderedDict()  # first = least recent
    used = 0.0
    hit = np.zeros(len(acc.expert), dtype=bool)
    # group the accesses by (unit, layer), keeping file order
    key = acc.unit * (acc.layer.max() + 1) + acc.layer
    bounds = np.flatnonzero(np.r_[True, key[1:] != key[:-1], True])
    for a, b in itertools.pairwise(bounds):
        j = int(acc.layer[a])
        cur: dict[tuple[int, int], None] = {}
        for i in range(a, b):
            e = (j, int(acc.expert[i]))
            if e in cur:
                hit[i] = True  # staged earlier in this batch
                if order == "last_use":
                    lru.move_to_end(e)
                continue
            cur[e] = None
            if e in lru:
                hit[i] = True
            else:
                used += size[j]
            lru[e] = None
            lru.move_to_end(e)
        # trim to budget from the cold end, never the layer just staged
        while used > budget:
            victim = next((v for v in lru if v not in cur), None)
            if victim is None:
                break
            del lru[victim]
            used -= size[victim[0]]
    return hit


def moesim_lru(trace_path: Path, mib: float, hw: str = "rtx4090",
               engine: str = "auto") -> tuple[np.ndarray, pd.DataFrame, Access]:
    """Per-access hits of a real moesim run (LRU, cache.mib, the prompt as one prefill step)
    and its summary; a miss is a demand copy in transfers.parquet."""
    from moesim.experiments.api import simulate

    trace = load_trace(trace_path)
    acc = accesses(trace, load_features(trace_path, "read_bytes"),
                   load_features(trace_path, "residency"))
    with tempfile.TemporaryDirectory() as tmp:
        summary = simulate(trace=str(trace_path), policy="lru", hw=hw, cache={"mib": mib},
                           replay="prefill", prefill_chunk=0, engine=engine, outdir=tmp,
                           output={"transfers": True})
        tr = pd.read_parquet(Path(tmp) / "transfers.parquet")
    tr = tr[tr["kind"] == "demand"].sort_values("start_s", kind="stable")
    layer_ids = np.asarray(trace.meta.moe_layers)
    t_layer = np.searchsorted(layer_ids, tr["layer"].to_numpy())
    t_expert = tr["expert"].to_numpy()
    # walk the (step, layer) cells in order; each cell's misses are the next run of copies
    # of its layer whose experts it demands
    hit = np.ones(len(acc.expert), dtype=bool)
    key = acc.unit * (acc.layer.max() + 1) + acc.layer
    bounds = np.flatnonzero(np.r_[True, key[1:] != key[:-1], True])
    p = 0
    for a, b in itertools.pairwise(bounds):
        j = int(acc.layer[a])
        first: dict[int, int] = {}
        for i in range(a, b):
            first.setdefault(int(acc.expert[i]), i)
        while p < len(t_layer) and t_layer[p] == j and int(t_expert[p]) in first:
            hit[first.pop(int(t_expert[p]))] = False
            p += 1
    if p != len(t_layer):
        raise TraceError(f"{len(t_layer) - p} of {len(t_layer)} demand copies could not be "
                         "placed on an access", file=trace_path, field="transfers")
    return hit, summary, acc


@dataclass
class Agreement:
    """One trace's comparison, one CSV row."""

    trace: str
    model: str
    cache_mib: float
    moesim_slots: int
    accesses: int
    prefill_accesses: int
    engine_hit_rate: float
    moesim_hit_rate: float
    moesim_lookup_hit_rate: float  # the run's hit_rate: one lookup per expert per layer step
    agree: int
    agreement: float
    agree_decode: float
    disagree_prefill: int
    disagree_decode: int
    engine_rules_agreement: float  # the stand-alone model with every rule as the engine's
    disagree_slots_rule: int  # the engine's rules with slots instead of bytes vs the engine
    flips_byte_vs_slot: int  # accesses flipped by counting slots instead of bytes
    flips_prefill_order: int  # ... then promoting in first-use instead of last-use order
    flips_rest: int  # ... then moesim itself (eviction before insertion, pins, tie-breaks)
    residency_col_prefill_zero: int  # prefill rows whose residency column is 0
    residency_col_matches_decode: float  # decode rows where residency==1 iff nothing read
    import_s: float


def check(name: str, trace_path: Path, mib: float, import_s: float = float("nan"),
          hw: str = "rtx4090") -> Agreement:
    meta = read_meta(trace_path)
    layer_bytes = [int(x) for x in meta.notes["expert_bytes_per_layer"].split(",")]
    m_hit, summary, acc = moesim_lru(trace_path, mib, hw=hw)
    budget = mib * 2**20
    e_hit = acc.engine_hit
    a0 = engine_rule_lru(acc, layer_bytes, budget, unit="bytes", order="last_use")
    a1 = engine_rule_lru(acc, layer_bytes, budget, unit="slots", order="last_use")
    a2 = engine_rule_lru(acc, layer_bytes, budget, unit="slots", order="first_use")
    same = m_hit == e_hit
    pre = acc.prefill
    dec = ~pre
    return Agreement(
        trace=name, model=meta.model, cache_mib=mib,
        moesim_slots=int(summary["cache.slots"].iloc[0]), accesses=len(e_hit),
        prefill_accesses=int(pre.sum()), engine_hit_rate=float(e_hit.mean()),
        moesim_hit_rate=float(m_hit.mean()),
        moesim_lookup_hit_rate=float(summary["hit_rate"].iloc[0]), agree=int(same.sum()),
        agreement=float(same.mean()), agree_decode=float(same[dec].mean()),
        disagree_prefill=int((~same & pre).sum()), disagree_decode=int((~same & dec).sum()),
        engine_rules_agreement=float((a0 == e_hit).mean()),
        disagree_slots_rule=int((a1 != e_hit).sum()), flips_byte_vs_slot=int((a0 != a1).sum()),
        flips_prefill_order=int((a1 != a2).sum()),
        flips_rest=int((a2 != m_hit).sum()),
        residency_col_prefill_zero=int((acc.residency[pre] == 0).sum()),
        residency_col_matches_decode=float(((acc.residency[dec] == 1) == e_hit[dec]).mean()),
        import_s=import_s,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moesim.traces.residency --out CSV``: import the three BigMoeOnEdge traces
    (timed), replay each and write one agreement row per trace."""
    from moesim.experiments.inputs import trace_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--traces", default="../shared/traces",
                    help="folder holding qwen3_gemma4_gptoss_bigmoeonedge/")
    args = ap.parse_args(argv)
    folder = Path(args.traces) / "qwen3_gemma4_gptoss_bigmoeonedge"
    files = {"qwen3_30b_a3b_bmoe": "qwen.route.csv", "gemma4_26b_a4b_bmoe": "gemma.route.csv",
             "gpt_oss_120b_bmoe": "gptoss.route.csv"}
    rows = []
    try:
        for name, fname in files.items():
            from moesim.traces import import_trace

            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "t.parquet"
                t0 = time.perf_counter()
                import_trace("bmoe-route-csv", folder / fname, out)
                dt = time.perf_counter() - t0
            path = trace_file(str(folder / fname), "bmoe-route-csv")
            rows.append(asdict(check(name, path, ENGINE_CACHE_MIB[name], import_s=dt)))
            print(f"{name}: agreement {rows[-1]['agreement']:.4f}", file=sys.stderr)
    except TraceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, index=False, float_format="%.6g")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
