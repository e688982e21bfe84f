"""numpy's summation orders, so that compiled sums round exactly as the policies' numpy code.

``np.add.reduce`` over a contiguous run of float64 uses pairwise summation (numpy's
``pairwise_sum``: under 8 items one by one, up to 128 with eight interleaved accumulators,
above that split in two at a multiple of 8); reducing the columns of a fancy-indexed 2-D array
adds them one by one instead (``tests/sim/test_compiled_engine.py`` checks both against numpy).
"""

from __future__ import annotations

from moesim.sim.compiled.layout import typed


@typed("f8(f8[:, ::1], i8, i8, i8)")
def _leaf(A, row, lo, n):
    """Up to 128 items: one by one under 8, else eight interleaved accumulators."""
    if n < 8:
        res = -0.0
        for i in range(n):
            res += A[row, lo + i]
        return res
    r0, r1, r2, r3 = A[row, lo], A[row, lo + 1], A[row, lo + 2], A[row, lo + 3]
    r4, r5, r6, r7 = A[row, lo + 4], A[row, lo + 5], A[row, lo + 6], A[row, lo + 7]
    i = 8
    stop = n - n % 8
    while i < stop:
        b = lo + i
        r0 += A[row, b]
        r1 += A[row, b + 1]
        r2 += A[row, b + 2]
        r3 += A[row, b + 3]
        r4 += A[row, b + 4]
        r5 += A[row, b + 5]
        r6 += A[row, b + 6]
        r7 += A[row, b + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += A[row, lo + i]
        i += 1
    return res


# numpy halves a longer run (at a multiple of 8) until the pieces have <= 128 items. Numba's
# cache cannot reload recursive functions (the process crashes), so each level is its own
# function: eight levels cover runs of up to MAX_PAIRWISE items.
@typed("f8(f8[:, ::1], i8, i8, i8)")
def _split1(A, row, lo, n):
    if n <= 128:
        return _leaf(A, row, lo, n)
    n2 = n // 2
    n2 -= n2 % 8
    return _leaf(A, row, lo, n2) + _leaf(A, row, lo + n2, n - n2)


@typed("f8(f8[:, ::1], i8, i8, i8)")
def _split2(A, row, lo, n):
    if n <= 128:
        return _leaf(A, row, lo, n)
    n2 = n // 2
    n2 -= n2 % 8
    return _split1(A, row, lo, n2) + _split1(A, row, lo + n2, n - n2)


@typed("f8(f8[:, ::1], i8, i8, i8)")
def _split3(A, row, lo, n):
    if n <= 128:
        return _leaf(A, row, lo, n)
    n2 = n // 2
    n2 -= n2 % 8
    return _split2(A, row, lo, n2) + _split2(A, row, lo + n2, n - n2)


@typed("f8(f8[:, ::1], i8, i8, i8)")
def _split4(A, row, lo, n):
    if n <= 128:
        return _leaf(A, row, lo, n)
    n2 = n // 2
    n2 -= n2 % 8
    return _split3(A, row, lo, n2) + _split3(A, row, lo + n2, n - n2)


@typed("f8(f8[:, ::1], i8, i8, i8)")
def _split5(A, row, lo, n):
    if n <= 128:
        return _leaf(A, row, lo, n)
    n2 = n // 2
    n2 -= n2 % 8
    return _split4(A, row, lo, n2) + _split4(A, row, lo + n2, n - n2)


@typed("f8(f8[:, ::1], i8, i8, i8)")
def _split6(A, row, lo, n):
    if n <= 128:
        return _leaf(A, row, lo, n)
    n2 = n // 2
    n2 -= n2 % 8
    return _split5(A, row, lo, n2) + _split5(A, row, lo + n2, n - n2)


@typed("f8(f8[:, ::1], i8, i8, i8)")
def _split7(A, row, lo, n):
    if n <= 128:
        return _leaf(A, row, lo, n)
    n2 = n // 2
    n2 -= n2 % 8
    return _split6(A, row, lo, n2) + _split6(A, row, lo + n2, n - n2)


MAX_PAIRWISE = 28672  # n / 2**8 + 16 <= 128 after eight halvings


@typed("f8(f8[:, ::1], i8, i8, i8)")
def _split8(A, row, lo, n):
    if n <= 128:
        return _leaf(A, row, lo, n)
    n2 = n // 2
    n2 -= n2 % 8
    return _split7(A, row, lo, n2) + _split7(A, row, lo + n2, n - n2)


@typed("f8(f8[:, ::1], i8, i8, i8)")
def pairwise(A, row, lo, n):
    """``A[row, lo:lo + n].sum()`` as numpy computes it (``n <= MAX_PAIRWISE``)."""
    return _split8(A, row, lo, n)
