"""The phone of the BigMoeOnEdge traces: a unified-memory profile whose slow tier is its flash."""

from __future__ import annotations

import re

import pytest

from moesim.hw_profiles import KINDS, load_profile
from moesim.traces.model_card import load_card

SOURCE_REF = re.compile(r"\bS\d+\b|notes §|https?://")


def test_loads_sourced_and_unified() -> None:
    prof = load_profile("oneplus_15r")
    assert prof.unified_memory and prof.host_link is None
    for q in prof.quantities():
        assert q.source.strip(), q
        if q.known:
            assert q.kind in KINDS, q
            assert SOURCE_REF.search(q.source), q.field


def test_expert_is_read_from_flash_at_the_measured_rate() -> None:
    prof = load_profile("oneplus_15r")
    link = prof.expert_link()
    assert link.name == "oneplus_15r:ufs->dram"
    with pytest.raises(ValueError, match="no host link"):
        prof.host_link_model()
    # one Qwen3-30B-A3B Q4_K_M expert (2,856,960 B mean) at 2,272 MiB/s: 1.20 ms
    nbytes = load_card("qwen3_30b_a3b_q4km").expert_bytes
    assert link.transfer_time(nbytes) * 1e3 == pytest.approx(nbytes / (2272 * 2**20) * 1e3,
                                                               rel=0.02)
