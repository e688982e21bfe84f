"""The accounting identities every run must satisfy (README "Metrics"), shared by the tests."""

from __future__ import annotations

import math

from moesim.sim.metrics import RunResult


def check_parts(res: RunResult) -> None:
    """Accesses split into hits, late hits, promoted and misses (also per layer); every counted
    prefetch transfer ends as useful, wasted or unused at the end; ratios stay in [0, 1]."""
    s, pl = res.summary, res.per_layer
    parts = ("hits", "late_hits", "promoted", "misses")
    assert sum(s[k] for k in parts) == s["accesses"], s
    for k in (*parts, "accesses"):
        assert pl[k].sum() == s[k], k
        assert min(s[k], pl[k].min()) >= 0, k
    # How each miss (or promoted prefetch) was served: copied on demand, run on the host CPU,
    # copied at low precision, or skipped (placement policies; all but the first are 0 under
    # placement=fetch).
    served = ("demand_fetches", "cpu_expert_execs", "low_precision_fetches", "skipped_experts")
    assert sum(s[k] for k in served) == s["misses"] + s["promoted"], s
    assert s["prefetch_transfers"] == (
        s["prefetch_useful"] + s["prefetch_wasted"] + s["prefetch_unused_at_end"]
    ), s
    assert 0 <= s["wasted_prefetch_bytes"] <= s["prefetch_bytes"]
    assert s["wasted_prefetch_bytes"] + s["unused_prefetch_bytes_at_end"] <= s["prefetch_bytes"]
    assert s["prefetch_served"] <= s["accesses"] - s["misses"] - s["promoted"]
    for k in ("hit_rate", "hit_rate_incl_late", "prefetch_precision", "prefetch_recall"):
        assert math.isnan(s[k]) or 0.0 <= s[k] <= 1.0, (k, s[k])
    if s["accesses"]:
        assert math.isclose(s["hit_rate_incl_late"] + s["miss_rate"], 1.0)
    if s["prefetch_transfers"] == 0:
        assert s["wasted_prefetch_bytes"] == 0 and s["prefetch_useful"] == 0
