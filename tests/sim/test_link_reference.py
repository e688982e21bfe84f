"""The event-driven host link equals a plain SimPy model of the same queue.

Reference: copy engines are a ``simpy.PriorityResource``; a demand request has priority 0, a
prefetch priority 1 (FIFO within a priority); each holds an engine for the transfer time.
Cancelled prefetches leave the queue before they start.
"""

import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.sim.cache import LOADING
from moesim.sim.link import HostLink


class _Cache:
    """Unbounded cache: every reservation succeeds."""

    def __init__(self, n: int) -> None:
        self.state = bytearray(n)
        self.counting = True  # the link attributes transfers by the cache's counting flag

    def reserve(self, key: int, prefetch: bool) -> bool:
        self.state[key] = LOADING
        return True

    def complete(self, key: int) -> None:
        self.state[key] = 2


jobs = st.lists(
    st.tuples(st.integers(0, 40), st.booleans(), st.booleans()),  # submit tick, demand?, cancel?
    min_size=1, max_size=30,
)


def _ours(js, engines, dur):
    cache = _Cache(len(js))
    link = HostLink(dur, engines, cache, record=True)
    cancels = []
    order = sorted(enumerate(js), key=lambda x: (x[1][0], x[0]))
    for n, (key, (tick, demand, cancel)) in enumerate(order):
        t = tick * 0.25
        for ck, ct in list(cancels):  # cancellations half a tick after submission (no ties)
            if ct <= t:
                link.advance(ct)
                link.cancel([ck])
                cancels.remove((ck, ct))
        link.advance(t)
        if demand:
            cache.reserve(key, False)
            link.submit_demand(key)
        else:
            link.submit_prefetch(key, float(n))  # FIFO among prefetches, as SimPy
            if cancel:
                cancels.append((key, t + 0.125))
    for ck, ct in sorted(cancels, key=lambda x: x[1]):
        link.advance(ct)
        link.cancel([ck])
    link.advance(1e9)
    return {key: (start, end) for key, _, start, end in link.records}


def _reference(js, engines, dur):
    env = simpy.Environment()
    res = simpy.PriorityResource(env, capacity=engines)
    out = {}

    def job(key, tick, demand, cancel):
        yield env.timeout(tick * 0.25)
        # Same-time submissions: demand and prefetch ordered as our link orders them.
        req = res.request(priority=0 if demand else 1)
        if cancel and not demand:
            timer = env.timeout(0.125)
            got = yield req | timer
            if req not in got:
                req.cancel()
                return
        else:
            yield req
        start = env.now
        yield env.timeout(dur)
        res.release(req)
        out[key] = (start, env.now)

    for key, (tick, demand, cancel) in sorted(enumerate(js), key=lambda x: (x[1][0], x[0])):
        env.process(job(key, tick, demand, cancel))
    env.run()
    return out


@settings(max_examples=300, deadline=None)
# Irrational durations keep completions off the submission grid: simultaneous events have no
# defined order in either model.
@given(js=jobs, engines=st.integers(1, 3),
       dur=st.sampled_from([0.1 * 2**0.5, 0.1 * 10**0.5, 0.5**0.5, 3**0.5]))
def test_link_matches_simpy_priority_resource(js, engines, dur):
    ours = _ours(js, engines, dur)
    ref = _reference(js, engines, dur)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert abs(ours[key][0] - ref[key][0]) < 1e-9, key
        assert abs(ours[key][1] - ref[key][1]) < 1e-9, key
