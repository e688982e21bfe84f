"""``moesim-profile host-cpu``: measure this machine's CPU as the host that runs missed experts.

Writes (or replaces) the ``host_cpu`` section of an existing profile YAML and keeps every other
section as it is. Microbenchmarks only, with the very ops the storage profiler and the executor
use (``hw_profiles.cpu_ops.expert_ffn`` through ``measure_storage.CpuComputeBench``), weights
cold (rotated through a pool larger than the CPU caches, as experts in host DRAM are):

* streaming-read bandwidth: a torch sum over a large buffer, bytes / time
  (``memory_bandwidth_measured_Bps``);
* dtype matmul FLOP/s at the same thread count (``flops_measured``);
* one routed expert's FFN by token count for the card (``measured.<card>.expert_s``);
* the same FFN at 1 token at the card's scale x 1, 1/2, 1/4 (a sixteen-fold range of weight
  bytes): the intercept of the line ``t = a + bytes / b`` is the fixed per-expert overhead
  ``a``; the card's expert at 1 token then reads ``B = bytes / (t - a)``, so
  ``memory_efficiency = B / streaming read``; ``flops_efficiency`` is the slowest
  ``2 x tokens x params / (t - a)`` that stays under every table point, over the matmul FLOP/s
  (so ``a`` + the roofline is a floor under every measured point, equal at 1 token).

Every point is timed in ``rounds`` rounds; medians are written and the round-to-round spread is
reported in the sources and the printed summary. The logic only sees a ``HostCpuBench``; tests
drive it with a fake one and with the real one on a tiny card.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from moesim.traces.model_card import ModelCard, load_card

from .measure import _q, _sig, write_profile
from .measure_storage import Spread, fit_latency_relative, isotonic
from .schema import ProfileError, load_yaml

FIT_SCALES = (1.0, 0.5, 0.25)  # factors on the card's scale for the overhead fit


class HostCpuBench(Protocol):
    """What the host-CPU measurement needs; ``measure_storage.CpuComputeBench`` or a fake."""

    def describe_cpu(self) -> dict[str, str]: ...
    def read_bandwidth(self) -> tuple[float, str]: ...  # one round: bytes/s, how
    def matmul_flops(self) -> tuple[float, str]: ...
    def op_samples(self, card: ModelCard, op: str, x: int) -> list[float]: ...


@dataclass(frozen=True)
class HostCpuOptions:
    tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    rounds: int = 5
    progress: bool = True
    command: str = "moesim-profile host-cpu"


@dataclass(frozen=True)
class HostCpuFit:
    """What the measurement found (seconds, bytes/s, FLOP/s)."""

    read_Bps: float
    flops: float
    overhead_s: float
    expert_Bps: float
    expert_flops: float
    table: list[list[float]]  # [[tokens, ms], ...], non-decreasing
    sizes: list[tuple[int, float]]  # (weight bytes, seconds) at 1 token

    @property
    def memory_efficiency(self) -> float:
        return min(1.0, self.expert_Bps / self.read_Bps)

    @property
    def flops_efficiency(self) -> float:
        return min(1.0, self.expert_flops / self.flops)


# /proc/cpuinfo flag -> the ISA name of host_cpu.isa (hw_profiles.host_cpu.ISAS)
_ISA_FLAGS = (("sse4_2", "sse4"), ("avx2", "avx2"), ("avx512f", "avx512f"),
              ("avx512_vnni", "avx512_vnni"), ("avx512_bf16", "avx512_bf16"),
              ("amx_tile", "amx"), ("asimd", "neon"), ("sve", "sve"))


def _proc_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_isa(cpuinfo: str) -> tuple[list[str], str]:
    """The instruction sets a runtime's CPU kernels may need (``host_cpu.isa``), read from the
    first ``flags``/``Features`` line of /proc/cpuinfo, and how they were read."""
    for line in cpuinfo.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(rest.split())
            isa = [name for flag, name in _ISA_FLAGS if flag in flags]
            return isa, f"flags of /proc/cpuinfo: {' '.join(isa) or 'none of interest'}"
    return [], ""


def fit_expert(sizes: Sequence[tuple[int, float]], table: Sequence[tuple[int, float]],
               params: int, nbytes: int) -> tuple[float, float, float]:
    """(overhead a >= 0, bandwidth B, FLOP/s F) from 1-token times by weight bytes and the
    non-decreasing per-token table of the measured card (``params`` weights, ``nbytes`` bytes).

    ``a`` is the intercept of the least-relative-error line ``t = a + bytes / b`` through the
    sizes, capped below every size's time and at 0.99 of the table's fastest (on a tiny or noisy
    expert the intercept can land above a measured point; no overhead exceeds a whole
    execution). B is what the measured card's expert gets at the table's smallest token count,
    ``nbytes / (t - a)``: the line's slope would do as well on a quiet machine, but on a loaded
    one the three small experts' noise moves it far more than it moves the largest expert's
    time. F is the largest ``2 x tokens x params / (t - a)`` over the table, the slowest
    arithmetic rate that keeps the roofline under every point. With both, ``a + roofline``
    equals the table's first point and stays under every other one.
    """
    a, _ = fit_latency_relative([(int(n), n / t) for n, t in sizes])
    a = min(a, 0.99 * min(t for _, t in table), min(t for _, t in sizes) * (1 - 1e-9))
    return a, nbytes / (table[0][1] - a), max(2.0 * x * params / (t - a) for x, t in table)


def run_host_cpu_measurement(bench: HostCpuBench, base: ModelCard, scale: float, card: ModelCard,
                             threads: int, opts: HostCpuOptions
                             ) -> tuple[dict[str, Any], HostCpuFit, Spread]:
    """Measure through ``bench``; returns (the ``host_cpu`` mapping, the fit, the spreads)."""
    machine = bench.describe_cpu()
    date = machine.get("date", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    src = f"{opts.command} ({date})"
    variants = [replace(base.scaled(scale * f, card.dtype), name=f"{base.name}@x{scale * f:g}")
                for f in FIT_SCALES]
    steps = opts.rounds + 1 + len(opts.tokens) + len(variants)
    bar = tqdm(total=steps, desc="moesim-profile host-cpu", unit="step",
               disable=not opts.progress, file=sys.stderr)
    spread = Spread()
    try:
        bar.set_postfix_str("streaming read")
        reads = []
        for _ in range(opts.rounds):
            bw, read_how = bench.read_bandwidth()
            reads.append(bw)
            bar.update(1)
        read_bw = spread.add("read", reads)
        flops, flops_how = bench.matmul_flops()
        bar.update(1)
        bar.set_postfix_str(f"{base.name} expert")
        raw = []
        for x in opts.tokens:
            raw.append((x, spread.add("ffn", bench.op_samples(card, "expert", x))))
            bar.update(1)
        bar.set_postfix_str("overhead fit")
        sizes = []
        for v in variants:
            sizes.append((v.expert_bytes, spread.add("fit", bench.op_samples(v, "expert", 1))))
            bar.update(1)
    finally:
        bar.close()
    fitted = isotonic([t for _, t in raw])
    table = [(x, t) for (x, _), t in zip(raw, fitted, strict=True)]
    a, expert_bw, expert_flops = fit_expert(sizes, table, card.expert_params, card.expert_bytes)
    table_ms: list[list[float]] = []
    for x, t in table:  # rounding must not undo the monotone fit
        table_ms.append([int(x), max(_sig(t * 1e3, 4), table_ms[-1][1] if table_ms else 0.0)])
    fit = HostCpuFit(read_Bps=read_bw, flops=flops, overhead_s=a, expert_Bps=expert_bw,
                     expert_flops=expert_flops, table=table_ms, sizes=sizes)
    cores = machine.get("cores", "?")
    sizes_txt = ", ".join(f"{n} B: {t * 1e6:.3g} us" for n, t in sizes)
    fit_how = (f"least-relative-error line t = a + bytes/b through cpu_ops.expert_ffn at 1 "
               f"token for {base.name} at scale x{', x'.join(f'{scale * f:g}' for f in FIT_SCALES)}"
               f" ({sizes_txt}); {spread.text('fit')}")
    isa, isa_how = cpu_isa(_proc_cpuinfo())
    mapping = {
        "cpu": machine.get("cpu", "this machine's CPU"),
        "isa": _q(isa or None, None, "measured" if isa else None,
                  f"{isa_how}; {src}" if isa else "no CPU flags readable on this OS"),
        "cores": _q(int(cores) if str(cores).isdigit() else 1, None, "measured",
                    f"logical CPUs reported by the OS (os.cpu_count); {src}"),
        "parallel": _q(1, None, "estimate",
                       f"one expert at a time, as measured: every execution uses all "
                       f"{threads} torch thread(s) (Fiddler's CPU path runs experts one after "
                       f"another, arXiv 2402.07033); {src}"),
        "memory_bandwidth_Bps": _q(None, None, None,
                                   "no datasheet figure for this machine's DRAM (a VM)"),
        "memory_bandwidth_measured_Bps": _q(_sig(read_bw / 1e9, 4), "GB/s", "measured",
                                            f"{read_how}; median of {opts.rounds} rounds; "
                                            f"{spread.text('read')}; {src}"),
        "memory_efficiency": _q(_sig(fit.memory_efficiency, 4), None, "measured",
                                f"B / streaming read = {expert_bw / 1e9:.3g} / "
                                f"{read_bw / 1e9:.3g} GB/s (capped at 1), B = {card.expert_bytes}"
                                f" weight bytes / (the table's {table[0][0]}-token time - a), a "
                                f"from the {fit_how}; {src}"),
        "flops": _q(None, None, None, "no datasheet figure for this machine's CPU (a VM)"),
        "flops_measured": _q(_sig(flops / 1e12, 4), "TFLOPS", "measured",
                             f"{flops_how}; {src}"),
        "flops_efficiency": _q(_sig(max(fit.flops_efficiency, 1e-4), 4), None, "measured",
                               f"best 2 x tokens x params / (t - a) over the expert table = "
                               f"{expert_flops / 1e9:.3g} GFLOP/s over the matmul figure "
                               f"(capped at 1); a from the overhead fit; {src}"),
        "per_expert_overhead_s": _q(_sig(a * 1e6, 3), "us", "measured",
                                    f"intercept a of the {fit_how}; {src}"),
        "notes": (f"Measured on {machine.get('device', 'this machine')} with {threads} torch "
                  f"thread(s) and {card.dtype} weights by `{opts.command}` (load average at "
                  f"start {machine.get('load_average_at_start', 'unknown')}). The roofline "
                  f"(effective bandwidth and FLOP/s, plus the overhead) times any card; the "
                  f"table times {base.name} x{scale:g} {card.dtype} exactly."),
        "measured": {base.name: {
            "notes": (f"Measured at {base.name} x{scale:g} (ModelCard.scaled); applies only to a "
                      f"card of exactly this shape and dtype (measured_at)."),
            "measured_at": {
                "base_card": base.name, "scale": scale, "dtype": card.dtype,
                "hidden_size": card.hidden_size,
                "moe_intermediate_size": card.moe_intermediate_size,
                "shared_intermediate_size": card.shared_intermediate_size,
                "dense_intermediate_size": card.dense_intermediate_size,
                "head_dim": card.head_dim, "torch_threads": threads,
            },
            "expert_s": _q(fit.table, "ms", "measured",
                           f"cpu_ops.expert_ffn (one routed expert) over [tokens], {card.dtype}, "
                           f"{threads} torch thread(s), weights rotated through a pool larger "
                           f"than the caches, median of {opts.rounds} rounds, made "
                           f"non-decreasing by isotonic regression; {spread.text('ffn')}; "
                           f"{src}"),
        }},
    }
    return mapping, fit, spread


def summary_lines(fit: HostCpuFit, spread: Spread) -> list[str]:
    return [
        f"host_cpu: streaming read {fit.read_Bps / 1e9:.3g} GB/s, matmul "
        f"{fit.flops / 1e9:.3g} GFLOP/s; {spread.text('read')} (read)",
        f"  expert fit: overhead {fit.overhead_s * 1e6:.3g} us, {fit.expert_Bps / 1e9:.3g} GB/s "
        f"(memory_efficiency {fit.memory_efficiency:.3g}), {fit.expert_flops / 1e9:.3g} GFLOP/s "
        f"(flops_efficiency {fit.flops_efficiency:.3g}); {spread.text('fit')}",
        f"  expert ms by tokens {fit.table}; {spread.text('ffn')}",
    ]


# --------------------------------------------------------------------------------------------
# CLI (``moesim-profile host-cpu``; wired in hw_profiles/measure.py)


def add_parser(sub: Any) -> None:
    s = sub.add_parser("host-cpu", help="measure this machine's CPU running one expert FFN and "
                       "write the host_cpu section of a profile YAML (other sections kept)")
    s.add_argument("--profile", type=Path, required=True,
                   help="profile YAML whose host_cpu section is (re)written")
    s.add_argument("--out", "-o", type=Path,
                   help="write here instead of in place (its stem must match the profile name)")
    s.add_argument("--model", "--card", dest="model", default="deepseek_v2_lite",
                   help="model card name or path")
    s.add_argument("--scale", type=float,
                   help="factor on the card's sizes (ModelCard.scaled); default: the scale of "
                        "the profile's compute table for this card, else 0.25")
    s.add_argument("--dtype", help="float32 | bfloat16 | float16; default: the dtype of the "
                   "profile's compute table for this card, else float32")
    s.add_argument("--torch-threads", type=int,
                   help="threads per expert execution; default: the profile's "
                        "machine.torch_threads, else every CPU")
    s.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    s.add_argument("--rounds", type=int, default=5, help="rounds per point (median, spread)")
    s.add_argument("--pool-mib", type=int, default=256,
                   help="weights are rotated through a pool this large (MiB), beyond the caches")
    s.add_argument("--read-mib", type=int, default=256,
                   help="size of the streaming-read buffer (MiB), beyond the caches")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _defaults(data: dict[str, Any], card: str) -> tuple[float | None, str | None, int | None]:
    """(scale, dtype, torch threads) the profile was measured at, where it says so."""
    table = (((data.get("compute") or {}).get("measured") or {}).get(card) or {})
    at = table.get("measured_at") or {} if isinstance(table, dict) else {}
    threads = (data.get("machine") or {}).get("torch_threads")
    return (at.get("scale"), at.get("dtype"),
            int(threads) if str(threads or "").isdigit() else None)


def run_cli(args: argparse.Namespace, argv: Sequence[str], bench: HostCpuBench | None = None
            ) -> int:
    """Validate everything, measure, then write the profile (nothing is written on error)."""
    from .cpu_ops import scaled_card
    from .profile import profile_from_mapping

    path: Path = args.profile
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        raise ValueError(f"--profile {path}: not a profile .yaml file")
    data = load_yaml(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping at top level")
    profile_from_mapping(data, str(path), allow_bare=False)  # the rest must already be valid
    out: Path = args.out or path
    if out.suffix not in (".yaml", ".yml"):
        raise ValueError(f"--out {out}: the profile must be a .yaml file")
    if data.get("name", path.stem) != out.stem:
        raise ValueError(f"--out {out}: the file stem must be the profile name "
                         f"{data.get('name', path.stem)!r}")
    folder = out.parent  # checked now: the measurement takes minutes
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: cannot write into {folder}")
    base = load_card(args.model)
    scale0, dtype0, threads0 = _defaults(data, base.name)
    scale = args.scale if args.scale is not None else float(scale0 or 0.25)
    dtype = args.dtype or dtype0 or "float32"
    threads = (args.torch_threads if args.torch_threads is not None
               else threads0 or os.cpu_count() or 1)  # an explicit 0 is refused, not ignored
    card = scaled_card(base, scale, dtype)
    if (min(args.tokens) < 1 or threads < 1 or args.rounds < 2 or args.pool_mib < 1
            or args.read_mib < 1):
        raise ValueError("need --tokens >= 1, --torch-threads >= 1, --rounds >= 2, "
                         "--pool-mib >= 1 and --read-mib >= 1")
    if min(scale * f for f in FIT_SCALES) * min(base.hidden_size, base.moe_intermediate_size) < 4:
        raise ValueError(f"--scale {scale:g} is too small to fit the overhead at x0.25 of it")
    opts = HostCpuOptions(tokens=tuple(sorted(set(args.tokens))), rounds=args.rounds,
                          progress=not args.no_progress,
                          command="moesim-profile " + " ".join(argv))
    t0 = time.perf_counter()
    own = None
    if bench is None:
        from .measure_storage import CpuComputeBench

        own = bench = CpuComputeBench(card, torch_threads=threads, seed=args.seed,
                                      rounds=args.rounds, max_pool_bytes=args.pool_mib * 2**20,
                                      cold=True, read_bytes=args.read_mib * 2**20)
    try:
        section, fit, spread = run_host_cpu_measurement(bench, base, scale, card, threads, opts)
    finally:
        if own is not None:
            own.close()
    data["host_cpu"] = section
    print(f"wrote {write_profile(data, out)} in {time.perf_counter() - t0:.0f} s")
    for line in summary_lines(fit, spread):
        print(line)
    return 0


__all__ = ["HostCpuBench", "HostCpuFit", "HostCpuOptions", "add_parser", "fit_expert",
           "run_cli", "run_host_cpu_measurement"]
