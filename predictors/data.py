"""Datasets from traces: rows of (request, token, layer) with features and true experts.

Splits are always *by request* (a request's tokens share a prompt, so a row split would leak
the prompt into the test set) and seeded: the same trace and seed give the same split.
Feature rows come from :func:`traces.store.load_features`, which is aligned with the recorded
(token, layer) rows of :func:`traces.store.iter_requests` (token-major, then layer).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim.traces.predictions import content_digest
from moesim.traces.store import load_features, load_trace, read_meta
from moesim.traces.trace import Trace


class PredictorError(ValueError):
    """Bad predictor input or config; the app prints its message as one line."""


@dataclass(frozen=True)
class Split:
    """Request ids of each part (sorted)."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def part(self, name: str) -> tuple[int, ...]:
        if name not in ("train", "val", "test"):
            raise PredictorError(f"unknown split part {name!r} (train, val, test)")
        return getattr(self, name)


def split_requests(
    request_ids: list[int] | np.ndarray, fractions: tuple[float, float, float], seed: int
) -> Split:
    """Shuffle request ids with ``seed`` and cut by ``fractions`` (train, val, test).

    Counts are rounded so that val and test get at least one request each when there are at
    least three requests (64 requests at 0.75/0.125/0.125 give 48/8/8).
    """
    ids = np.asarray(sorted(int(r) for r in request_ids), dtype=np.int64)
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
        raise PredictorError(f"split fractions must be three non-negative numbers: {fractions}")
    fr = fr / fr.sum()
    n = len(ids)
    n_val = round(n * float(fr[1]))
    n_test = round(n * float(fr[2]))
    if n >= 3:
        n_val = max(n_val, 1 if fr[1] > 0 else 0)
        n_test = max(n_test, 1 if fr[2] > 0 else 0)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise PredictorError(f"{n} requests are too few for split {tuple(fractions)}")
    perm = np.random.default_rng(seed).permutation(ids)
    parts = np.split(perm, [n_train, n_train + n_val])
    return Split(*(tuple(sorted(int(x) for x in p)) for p in parts))


@dataclass
class Rows:
    """Recorded (token, layer) rows of a trace, in file order.

    ``experts`` is ``int16 [N, k]`` (router rank order), ``layer`` the dense layer index,
    ``prev`` the row index of the same layer's previous token in the same request (-1 = none).
    """

    request: np.ndarray  # int64 [N]
    token: np.ndarray  # int64 [N]
    layer: np.ndarray  # int64 [N]
    experts: np.ndarray  # int16 [N, k]
    prev: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.request)

    def mask(self, request_ids: tuple[int, ...] | list[int]) -> np.ndarray:
        return np.isin(self.request, np.asarray(list(request_ids), dtype=np.int64))


def trace_rows(trace: Trace) -> Rows:
    """Flatten a trace to its recorded rows in file order (aligned with ``load_features``)."""
    req, tok, lay, exp, prev = [], [], [], [], []
    base = 0
    for r in trace.requests:
        have = r.experts[:, :, 0] >= 0  # [T, L]
        t_idx, j_idx = np.nonzero(have)  # row-major = token-major, then layer
        n = len(t_idx)
        index = np.full(have.shape, -1, dtype=np.int64)
        index[t_idx, j_idx] = base + np.arange(n)
        p = np.full(have.shape, -1, dtype=np.int64)
        p[1:] = index[:-1]
        req.append(np.full(n, r.request_id, dtype=np.int64))
        tok.append(t_idx.astype(np.int64))
        lay.append(j_idx.astype(np.int64))
        exp.append(r.experts[t_idx, j_idx])
        prev.append(p[t_idx, j_idx])
        base += n
    k = trace.meta.top_k
    if not req:
        z = np.zeros(0, dtype=np.int64)
        return Rows(z, z, z, np.zeros((0, k), dtype=np.int16), z)
    return Rows(
        np.concatenate(req), np.concatenate(tok), np.concatenate(lay),
        np.concatenate(exp).astype(np.int16), np.concatenate(prev),
    )


@dataclass
class TraceData:
    """A loaded trace, its rows, an optional feature matrix and a content fingerprint."""

    path: Path
    trace: Trace
    rows: Rows
    features: np.ndarray | None  # float16/float32 [N, D]
    feature: str | None
    fingerprint: str


def file_digest(path: Path) -> str:
    """Content hash of a file (the model cache key must change when the trace does). A run
    asks for its trace's hash several times (run hash, table key, model key); the hash is
    remembered per (path, size, modification time), so the file is read once."""
    st = Path(path).stat()
    return _digest_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key only
    return content_digest(path)


def load_data(path: str | Path, feature: str | None = None) -> TraceData:
    """Load a trace (and ``feat.<feature>`` when given) and check the rows line up."""
    path = Path(path)
    if not path.is_file():
        raise PredictorError(f"trace file not found: {path}")
    read_meta(path)  # clear TraceError for non-trace files before anything else
    trace = load_trace(path)
    rows = trace_rows(trace)
    feats = None
    if feature:
        feats = load_features(path, feature)
        if len(feats) != len(rows):
            raise PredictorError(
                f"{path}: feature {feature!r} has {len(feats)} rows but the trace {len(rows)}"
            )
    return TraceData(path, trace, rows, feats, feature, file_digest(path))


def full_ranking_from_routers(
    router_in: np.ndarray, layer: np.ndarray, routers: dict[int, np.ndarray],
    layer_ids: tuple[int, ...],
) -> np.ndarray:
    """Router logits ``[N, E]`` recomputed as ``router_in @ W_l.T`` (full expert ranking).

    The trace stores only the top-k ids; with the router weights (the embedded trace ships a
    ``.routers.npz`` side file) the full ranking beyond top-k is recoverable for the ranking
    bands of the pre-attention loss.
    """
    x = np.asarray(router_in, dtype=np.float32)
    e = next(iter(routers.values())).shape[0]
    out = np.zeros((len(x), e), dtype=np.float32)
    for j, lid in enumerate(layer_ids):
        m = layer == j
        if m.any():
            out[m] = x[m] @ np.asarray(routers[lid], dtype=np.float32).T
    return out
