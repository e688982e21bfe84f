"""LinkModel: interpolation, clamping, latency, and the monotonicity the simulator relies on."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.hw_profiles import LinkModel, list_profiles, load_profile


def test_peak_only_link_is_latency_plus_size_over_peak() -> None:
    link = LinkModel("x", 2.6e-6, (), 25.7e9, 1)
    assert link.bandwidth(123) == 25.7e9
    assert link.transfer_time(17_301_504) == pytest.approx(2.6e-6 + 17_301_504 / 25.7e9)
    assert link.transfer_time(0) == 0.0
    assert link.transfer_time(-5) == 0.0


def test_curve_hits_its_points_and_clamps_at_the_ends() -> None:
    curve = ((1000, 0.4e9), (100_000, 9.2e9), (10_000_000, 12.4e9))
    link = LinkModel("x", 0.0, curve, 12.4e9)
    for size, bw in curve:
        assert link.bandwidth(size) == pytest.approx(bw)
    assert link.bandwidth(1) == 0.4e9
    assert link.bandwidth(10**12) == 12.4e9
    # log-log interpolation: halfway in log size between 1e5 and 1e7 is the geometric mean
    assert link.bandwidth(1_000_000) == pytest.approx((9.2e9 * 12.4e9) ** 0.5)
    assert link.transfer_time(1_000_000) == pytest.approx(1e6 / link.bandwidth(1_000_000))


def test_invalid_links_are_refused() -> None:
    with pytest.raises(ValueError, match="latency"):
        LinkModel("x", -1.0, (), 1e9)
    with pytest.raises(ValueError, match="peak"):
        LinkModel("x", 0.0, (), 0.0)
    with pytest.raises(ValueError, match="ascend"):
        LinkModel("x", 0.0, ((2000, 1e9), (1000, 1e9)), 1e9)
    with pytest.raises(ValueError, match="copy time must not fall"):
        LinkModel("x", 0.0, ((1000, 1e8), (2000, 1e10)), 1e10)


def test_scaled_to_peak_keeps_the_shape() -> None:
    link = LinkModel("x", 0.0, ((1000, 0.4e9), (10_000_000, 12.4e9)), 12.4e9)
    fast = link.scaled_to_peak(24.8e9)
    assert fast.peak_bandwidth_Bps == 24.8e9
    assert fast.bandwidth(1000) == pytest.approx(0.8e9)
    assert fast.bandwidth(10**9) == pytest.approx(24.8e9)


@st.composite
def links(draw: st.DrawFn) -> LinkModel:
    """Random valid links: ascending sizes, copy time non-decreasing, optional latency."""
    n = draw(st.integers(0, 8))
    sizes = sorted(set(draw(st.lists(st.integers(1, 10**10), min_size=n, max_size=n))))
    points: list[tuple[int, float]] = []
    time = draw(st.floats(1e-7, 1e-3))
    for s in sizes:
        if points:  # time may stay equal or grow, never fall
            time = time * draw(st.floats(1.0, 10.0)) if draw(st.booleans()) else time
            time = max(time, points[-1][0] / points[-1][1])
        points.append((s, s / time))
    latency = draw(st.sampled_from([0.0, 2.6e-6, 6.5e-6]))
    peak = max((b for _, b in points), default=draw(st.floats(1e6, 1e11)))
    return LinkModel("random", latency, tuple(points), peak, 1)


sizes_st = st.integers(0, 2 * 10**10)


@settings(max_examples=300, deadline=None)
@given(links(), sizes_st, sizes_st)
def test_transfer_time_is_monotone_in_bytes(link: LinkModel, a: int, b: int) -> None:
    lo, hi = min(a, b), max(a, b)
    assert link.transfer_time(lo) <= link.transfer_time(hi)


@settings(max_examples=300, deadline=None)
@given(links(), st.integers(1, 2 * 10**10))
def test_bandwidth_stays_within_the_curve(link: LinkModel, n: int) -> None:
    bws = [b for _, b in link.curve] or [link.peak_bandwidth_Bps]
    bw = link.bandwidth(n)
    assert min(bws) * (1 - 1e-9) <= bw <= max(bws) * (1 + 1e-9)


@cache
def _expert_link(name: str) -> LinkModel:
    return load_profile(name).expert_link()


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list_profiles()), sizes_st, sizes_st)
def test_shipped_expert_links_are_monotone(name: str, a: int, b: int) -> None:
    link = _expert_link(name)
    lo, hi = min(a, b), max(a, b)
    assert link.transfer_time(lo) <= link.transfer_time(hi)
    if lo > 0:
        bws = [x for _, x in link.curve] or [link.peak_bandwidth_Bps]
        assert min(bws) * (1 - 1e-9) <= link.bandwidth(lo) <= max(bws) * (1 + 1e-9)


@settings(max_examples=200, deadline=None)
@given(links(), st.integers(1, 10**10), st.integers(0, 64))
def test_monotone_at_adjacent_sizes_and_curve_points(link: LinkModel, n: int, d: int) -> None:
    # 1-ulp rounding at segment joints is where a naive interpolation goes wrong
    assert link.transfer_time(n) <= link.transfer_time(n + d)
    for s, _ in link.curve:
        assert link.transfer_time(s - 1) <= link.transfer_time(s) <= link.transfer_time(s + 1)
