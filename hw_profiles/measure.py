"""``moesim-profile``: measure a CUDA GPU into a profile YAML; plot link curves; print a table.

    moesim-profile [measure] --model deepseek_v2_lite --out hw_profiles/my_gpu.yaml
    moesim-profile storage --model deepseek_v2_lite --scale 0.25 --out hw_profiles/x.yaml
    moesim-profile host-cpu --profile hw_profiles/x.yaml --model deepseek_v2_lite
    moesim-profile plot v100_pcie a100_sxm4 --out curves.png [--out curves.pdf]
    moesim-profile table [PROFILE ...] [--host-cpu [--card CARD]]

The measurement logic only sees timers (callables returning seconds), supplied by a ``Bench``.
``CudaBench`` builds them with torch and CUDA events; tests pass a fake bench, so the logic and
the YAML it writes are checked without a GPU. torch is imported only when measuring.
``storage`` (hw_profiles/measure_storage.py) measures this machine's disk (O_DIRECT) and CPU
for the storage-backed offloading executor instead; ``host-cpu``
(hw_profiles/measure_host_cpu.py) writes a profile's ``host_cpu`` section: this CPU running one
expert FFN, for placements that compute a missed expert on the host. Bad input: one line on
stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import yaml
from tqdm import tqdm

from moesim.traces.model_card import ModelCard, ModelCardError, load_card

from .profile import list_profiles, profile_from_mapping
from .schema import ProfileError

EXIT_NO_CUDA = 2
EXIT_BAD_INPUT = 2
CopyTimer = Callable[[int], float]  # nbytes -> seconds per copy (back-to-back mean)
StreamsTimer = Callable[[int, int], float]  # (nbytes, streams) -> wall seconds, one copy/stream
OpTimer = Callable[[int], float]  # batch, tokens or context -> seconds per call


class Bench(Protocol):
    """What the measurement needs from a device; CudaBench on GPUs, fakes in tests."""

    def describe(self) -> dict[str, str]: ...
    def memory_bytes(self) -> int: ...
    def memory_bandwidth(self) -> tuple[float, str]: ...
    def matmul_flops(self) -> tuple[float, str]: ...
    def h2d_timer(self, pinned: bool) -> CopyTimer: ...
    def streams_timer(self) -> StreamsTimer: ...
    def mlp_timer(self, card: ModelCard, intermediate: int) -> OpTimer: ...
    def router_timer(self, card: ModelCard) -> OpTimer: ...
    def attention_timer(self, card: ModelCard) -> OpTimer: ...


@dataclass(frozen=True)
class MeasureOptions:
    sizes: tuple[int, ...]
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    contexts: tuple[int, ...] = (512, 2048, 8192)
    concurrency_bytes: int = 64 * 2**20
    progress: bool = True


def default_sizes(lo: int = 4 * 2**10, hi: int = 512 * 2**20) -> tuple[int, ...]:
    """Powers of two from 4 KiB to 512 MiB, plus ``hi`` itself."""
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= 2
    out.append(hi)
    return tuple(sorted(set(out)))


# --------------------------------------------------------------------------------------------
# Pure measurement logic


def _sig(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


def measure_curve(copy_time: CopyTimer, sizes: Iterable[int], tick: Callable[[], None]
                  ) -> list[tuple[int, float]]:
    """(bytes, bytes/s) points; noise that makes a bigger copy look faster is flattened.

    The loader rejects curves whose copy time falls with size, so a point whose time is below
    its predecessor's gets the predecessor's time (rounded down a hair to survive rounding).
    """
    points: list[tuple[int, float]] = []
    for n in sizes:
        t = copy_time(n)
        if not t > 0:
            raise ValueError(f"copy timer returned {t!r} s for {n} bytes")
        bw = _sig(n / t)
        if points and n / bw < points[-1][0] / points[-1][1]:
            bw = _sig(n / (points[-1][0] / points[-1][1]) * (1 - 1e-4))
        points.append((int(n), bw))
        tick()
    return points


def fit_latency(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares fit of t = a + s/B to a curve; returns (a >= 0, B)."""
    s = [float(p[0]) for p in points]
    t = [p[0] / p[1] for p in points]
    n = len(s)
    ms, mt = sum(s) / n, sum(t) / n
    var = sum((x - ms) ** 2 for x in s)
    slope = sum((x - ms) * (y - mt) for x, y in zip(s, t, strict=True)) / var if var else 0.0
    a = mt - slope * ms
    return max(a, 0.0), (1.0 / slope if slope > 0 else max(p[1] for p in points))


def measure_copy_engines(streams_time: StreamsTimer, nbytes: int) -> tuple[int, float]:
    """Copies that progress at once: 2 if two streams' copies take < 1.5x one copy, else 1."""
    one = streams_time(nbytes, 1)
    two = streams_time(nbytes, 2)
    ratio = two / one
    return (2 if ratio < 1.5 else 1), ratio


def measure_series(op_time: OpTimer, xs: Iterable[int], tick: Callable[[], None]
                   ) -> list[list[float]]:
    """[[x, milliseconds], ...] for ascending x."""
    out = []
    for x in sorted(set(xs)):
        out.append([int(x), _sig(op_time(x) * 1e3, 4)])
        tick()
    return out


def _q(value: Any, unit: str | None, kind: str | None, source: str) -> dict[str, Any]:
    node: dict[str, Any] = {"value": value}
    if unit is not None and value is not None:
        node["unit"] = unit
    node["kind"] = kind
    node["source"] = source
    return node


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "gpu"


def run_measurement(bench: Bench, card: ModelCard, name: str, opts: MeasureOptions
                    ) -> dict[str, Any]:
    """Run every measurement through ``bench`` and return the profile as a plain mapping."""
    machine = bench.describe()
    src = f"moesim-profile {machine.get('date', '')} on {machine.get('gpu_name', 'this GPU')}"
    has_shared = card.shared_intermediate_size > 0
    steps = (2 * len(opts.sizes) + 4 + len(opts.contexts)
             + len(opts.batches) * (2 + int(has_shared)))
    bar = tqdm(total=steps, desc="moesim-profile", unit="step", disable=not opts.progress,
               file=sys.stderr)

    def tick() -> None:
        bar.update(1)

    try:
        bar.set_postfix_str("H2D pinned")
        pinned = measure_curve(bench.h2d_timer(True), opts.sizes, tick)
        bar.set_postfix_str("H2D pageable")
        pageable = measure_curve(bench.h2d_timer(False), opts.sizes, tick)
        bar.set_postfix_str("2 streams")
        engines, ratio = measure_copy_engines(bench.streams_timer(), opts.concurrency_bytes)
        tick()
        mem_bw, mem_how = bench.memory_bandwidth()
        tick()
        flops, flops_how = bench.matmul_flops()
        tick()
        mem_bytes = bench.memory_bytes()
        tick()
        bar.set_postfix_str("attention")
        attention = measure_series(bench.attention_timer(card), opts.contexts, tick)
        bar.set_postfix_str("router")
        router = measure_series(bench.router_timer(card), opts.batches, tick)
        bar.set_postfix_str("expert FFN")
        expert = measure_series(bench.mlp_timer(card, card.moe_intermediate_size), opts.batches,
                                tick)
        shared = None
        if has_shared:
            bar.set_postfix_str("shared FFN")
            shared = measure_series(bench.mlp_timer(card, card.shared_intermediate_size),
                                    opts.batches, tick)
    finally:
        bar.close()

    a, fit_bw = fit_latency(pinned)

    def link(points: list[tuple[int, float]], what: str) -> dict[str, Any]:
        return {
            "peak_bandwidth_Bps": _q(_sig(max(b for _, b in points) / 1e9), "GB/s", "measured",
                                     f"plateau (max) of the {what} curve below; {src}"),
            "latency_s": _q(0, "us", "estimate",
                            "0 on purpose: the curve was timed with back-to-back copies and "
                            "already contains the per-copy cost; adding it would double count"),
            "curve": {
                "unit": "GB/s",
                "kind": "measured",
                "source": f"{what} host-to-device copies, CUDA-event timed, back-to-back; {src}",
                "value": [[s, _sig(b / 1e9)] for s, b in points],
            },
        }

    mlp_note = "per call, CUDA-event timed, fp16"
    table: dict[str, Any] = {
        "notes": f"Measured by moesim-profile with fp16 weights at batch 1 (attention) and "
                 f"batch/tokens {list(opts.batches)}; {src}",
        "attention_s": _q(attention, "ms", "measured",
                          f"2 RMSNorms + QKV/O projections + SDPA over a KV cache of [context] "
                          f"tokens, batch 1, {mlp_note}; {src}"),
        "router_s": _q(router, "ms", "measured", f"router linear + softmax + top-k, [batch], "
                       f"{mlp_note}; {src}"),
        "expert_s": _q(expert, "ms", "measured", f"one routed expert MLP over [tokens], "
                       f"{mlp_note}; {src}"),
    }
    if shared is not None:
        table["shared_s"] = _q(shared, "ms", "measured", f"the shared-expert MLP of one layer "
                               f"over [tokens], {mlp_note}; {src}")
    unused = "unused: this profile has a measured {}"
    return {
        "name": name,
        "device": machine.get("gpu_name", "unknown GPU"),
        "description": f"measured by moesim-profile on {machine.get('date', '?')}",
        "unified_memory": False,
        "machine": machine,
        "gpu": {
            "memory_bytes": _q(_sig(mem_bytes / 2**30, 6), "GiB", "spec",
                               f"total memory reported by the CUDA driver; {src}"),
            "memory_bandwidth_Bps": _q(None, None, None,
                                       "datasheet value not known to moesim-profile; fill in"),
            "memory_bandwidth_measured_Bps": _q(_sig(mem_bw / 1e9, 4), "GB/s", "measured",
                                                f"{mem_how}; {src}"),
            "fp16_flops": _q(None, None, None,
                             "datasheet value not known to moesim-profile; fill in"),
            "fp16_flops_measured": _q(_sig(flops / 1e12, 4), "TFLOPS", "measured",
                                      f"{flops_how}; {src}"),
        },
        "host_link": {
            "bus": machine.get("pcie", "not recorded"),
            "host_memory": "pinned",
            "copy_engines": _q(engines, None, "measured",
                               f"2 concurrent {opts.concurrency_bytes // 2**20} MiB H2D copies "
                               f"on 2 streams took {ratio:.2f}x one copy; {src}"),
            "pinned": link(pinned, "pinned"),
            "pageable": link(pageable, "pageable"),
            "per_copy_overhead_s": _q(_sig(a * 1e6, 3), "us", "estimate",
                                      f"least-squares fit t = a + s/B to the pinned curve "
                                      f"(B = {fit_bw / 1e9:.3g} GB/s); informational"),
        },
        "compute": {
            "memory_efficiency": _q(1.0, None, "estimate", unused.format("memory bandwidth")),
            "flops_efficiency": _q(1.0, None, "estimate", unused.format("fp16 throughput")),
            "measured": {card.name: table},
        },
    }


def write_profile(mapping: dict[str, Any], path: Path) -> Path:
    """Validate (strictly, as load_profile would) and write the YAML with a header."""
    profile_from_mapping(mapping, str(path), allow_bare=False)
    header = (
        "# Hardware profile written by moesim-profile.\n"
        "# Numbers are {value, unit, kind, source}. Fill in the datasheet (spec) values left\n"
        "# null before comparing against other profiles.\n"
    )
    return write_yaml(mapping, path, header)


def write_yaml(mapping: dict[str, Any], path: Path, header: str) -> Path:
    """``header`` then ``mapping`` as block YAML (flow style for leaves), written whole or not
    at all (a temporary file renamed over ``path``)."""
    text = yaml.safe_dump(mapping, sort_keys=False, default_flow_style=None, width=4096,
                          allow_unicode=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(header + text, encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------
# torch / CUDA bench (only imported when measuring on a GPU)


class CudaBench:
    """Timers built from torch ops on one CUDA device, timed with CUDA events (fp16).

    ``device="cpu"`` with an injected ``timer`` runs the same op code on CPU, which is how the
    tests check it without a GPU (pinned memory and streams stay CUDA-only).
    """

    def __init__(
        self,
        torch: Any,
        device: int | str = 0,
        max_bytes: int = 512 * 2**20,
        *,
        timer: Callable[[Callable[[], Any], int], float] | None = None,
        matmul_n: int = 8192,
        copy_bytes: int = 2**30,
    ) -> None:
        self.torch = torch
        self.dev = torch.device(device) if isinstance(device, str) else torch.device("cuda",
                                                                                      device)
        if self.dev.type == "cuda":
            torch.cuda.set_device(self.dev)
        self.max_bytes = max_bytes
        self.dtype = torch.float16
        self.timer = timer
        self.matmul_n = matmul_n
        self.copy_bytes = copy_bytes

    def _time(self, fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
        torch = self.torch
        for _ in range(warmup):
            fn()
        if self.timer is not None:
            return self.timer(fn, repeats)
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats

    @staticmethod
    def _repeats(nbytes: int, budget_bytes: float = 2e8) -> int:
        return max(3, min(200, int(budget_bytes / max(nbytes, 1))))

    def describe(self) -> dict[str, str]:
        torch = self.torch
        props = torch.cuda.get_device_properties(self.dev)
        out = {
            "gpu_name": torch.cuda.get_device_name(self.dev),
            "compute_capability": f"{props.major}.{props.minor}",
            "driver": "unknown",
            "cuda": str(torch.version.cuda),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "os": platform.platform(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        query = "driver_version,pcie.link.gen.max,pcie.link.width.max"
        try:
            line = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader",
                 f"--id={self.dev.index}"], capture_output=True, text=True, timeout=20, check=True,
            ).stdout.strip()
            driver, gen, width = (x.strip() for x in line.split(","))
            out["driver"] = driver
            out["pcie"] = f"PCIe {gen}.0 x{width} (nvidia-smi max link)"
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        return out

    def memory_bytes(self) -> int:
        return int(self.torch.cuda.get_device_properties(self.dev).total_memory)

    def memory_bandwidth(self) -> tuple[float, str]:
        n = self.copy_bytes
        if self.dev.type == "cuda":
            n = min(n, self.memory_bytes() // 8)
        src = self.torch.empty(n, dtype=self.torch.uint8, device=self.dev)
        dst = self.torch.empty_like(src)
        t = self._time(lambda: dst.copy_(src), repeats=20)
        return 2 * n / t, f"device-to-device copy of {n // 2**20} MiB, 2 x bytes / time"

    def matmul_flops(self) -> tuple[float, str]:
        n = self.matmul_n
        a = self.torch.randn(n, n, dtype=self.dtype, device=self.dev)
        b = self.torch.randn(n, n, dtype=self.dtype, device=self.dev)
        t = self._time(lambda: a @ b, repeats=20)
        return 2 * n**3 / t, f"fp16 matmul {n}x{n}x{n}, 2n^3 / time"

    def h2d_timer(self, pinned: bool) -> CopyTimer:
        torch = self.torch
        host = torch.empty(self.max_bytes, dtype=torch.uint8,
                           pin_memory=pinned and self.dev.type == "cuda")
        dev = torch.empty(self.max_bytes, dtype=torch.uint8, device=self.dev)

        def copy_time(n: int) -> float:
            return self._time(lambda: dev[:n].copy_(host[:n], non_blocking=pinned),
                              self._repeats(n))

        return copy_time

    def streams_timer(self) -> StreamsTimer:
        torch = self.torch
        n_max = 64 * 2**20
        hosts = [torch.empty(n_max, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        devs = [torch.empty(n_max, dtype=torch.uint8, device=self.dev) for _ in range(2)]
        streams = [torch.cuda.Stream(self.dev) for _ in range(2)]

        def run(n: int, k: int) -> float:
            n = min(n, n_max)

            def once() -> None:
                main = torch.cuda.current_stream(self.dev)
                for i in range(k):
                    streams[i].wait_stream(main)
                    with torch.cuda.stream(streams[i]):
                        devs[i][:n].copy_(hosts[i][:n], non_blocking=True)
                for i in range(k):
                    main.wait_stream(streams[i])

            return self._time(once, repeats=10)

        return run

    def mlp_timer(self, card: ModelCard, intermediate: int) -> OpTimer:
        torch = self.torch
        f = torch.nn.functional
        h = card.hidden_size
        w_in = torch.randn(intermediate, h, dtype=self.dtype, device=self.dev) * 0.02
        w_gate = torch.randn(intermediate, h, dtype=self.dtype, device=self.dev) * 0.02
        w_out = torch.randn(h, intermediate, dtype=self.dtype, device=self.dev) * 0.02

        def op_time(tokens: int) -> float:
            x = torch.randn(tokens, h, dtype=self.dtype, device=self.dev)
            if card.gated:
                return self._time(lambda: f.linear(f.silu(f.linear(x, w_gate)) * f.linear(x, w_in),
                                                   w_out), repeats=50)
            return self._time(lambda: f.linear(f.relu(f.linear(x, w_in)), w_out), repeats=50)

        return op_time

    def router_timer(self, card: ModelCard) -> OpTimer:
        torch = self.torch
        w = torch.randn(card.num_experts, card.hidden_size, dtype=self.dtype, device=self.dev)

        def op_time(batch: int) -> float:
            x = torch.randn(batch, card.hidden_size, dtype=self.dtype, device=self.dev)
            return self._time(
                lambda: torch.topk(torch.softmax(torch.nn.functional.linear(x, w).float(), -1),
                                   card.top_k, dim=-1), repeats=50)

        return op_time

    def attention_timer(self, card: ModelCard) -> OpTimer:
        torch = self.torch
        f = torch.nn.functional
        h = card.hidden_size
        nh = card.num_attention_heads or max(1, h // 128)
        hd = card.head_dim or h // nh
        nkv = card.num_kv_heads or nh
        w_q = torch.randn(nh * hd, h, dtype=self.dtype, device=self.dev) * 0.02
        w_kv = torch.randn(2 * nkv * hd, h, dtype=self.dtype, device=self.dev) * 0.02
        w_o = torch.randn(h, nh * hd, dtype=self.dtype, device=self.dev) * 0.02
        norm_w = torch.ones(h, dtype=self.dtype, device=self.dev)

        def op_time(context: int) -> float:
            x = torch.randn(1, h, dtype=self.dtype, device=self.dev)
            k = torch.randn(1, nkv, context, hd, dtype=self.dtype, device=self.dev)
            v = torch.randn_like(k)

            def step() -> Any:
                y = f.rms_norm(x, (h,), norm_w)
                q = f.linear(y, w_q).view(1, nh, 1, hd)
                f.linear(y, w_kv)  # new token's K/V projection (cache append not timed)
                o = f.scaled_dot_product_attention(q, k, v, enable_gqa=nkv != nh)
                return f.rms_norm(f.linear(o.reshape(1, nh * hd), w_o), (h,), norm_w)

            return self._time(step, repeats=50)

        return op_time


def _cuda_bench(device: int) -> tuple[CudaBench | None, str]:
    try:
        import torch
    except ImportError:
        return None, "torch is not installed; install torch with CUDA support to measure a GPU"
    if not torch.cuda.is_available():
        return None, (
            "no CUDA device is available (torch.cuda.is_available() is False). Run "
            "moesim-profile on the machine whose GPU you want to profile, or pick a shipped "
            f"profile: {', '.join(list_profiles())}"
        )
    if device >= torch.cuda.device_count():
        return None, f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) found"
    return CudaBench(torch, device), ""


# --------------------------------------------------------------------------------------------
# CLI

_COMMANDS = ("measure", "storage", "host-cpu", "plot", "table")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moesim-profile", description=(__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    m = sub.add_parser("measure", help="measure this machine's CUDA GPU into a profile YAML "
                       "(the default command)")
    m.add_argument("--model", default="deepseek_v2_lite", help="model card name or path")
    m.add_argument("--out", type=Path, help="output YAML; its stem becomes the profile name "
                   "(default: ./<gpu name>.yaml)")
    m.add_argument("--device", type=int, default=0, help="CUDA device index")
    m.add_argument("--min-bytes", type=int, default=4 * 2**10)
    m.add_argument("--max-bytes", type=int, default=512 * 2**20)
    m.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    m.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    m.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    from .measure_storage import add_parser as add_storage_parser

    add_storage_parser(sub)
    from .measure_host_cpu import add_parser as add_host_cpu_parser

    add_host_cpu_parser(sub)
    pl = sub.add_parser("plot", help="overlay the expert-link bandwidth curves of profiles")
    pl.add_argument("profiles", nargs="+", help="profile names or YAML paths")
    pl.add_argument("--out", type=Path, action="append", required=True,
                    help="output .png or .pdf (repeat for both)")
    pl.add_argument("--mark-card", action="append", default=[],
                    help="draw a line at this model card's expert size (repeatable)")
    t = sub.add_parser("table", help="print the key figures of profiles as a markdown table")
    t.add_argument("profiles", nargs="*", help="profile names or paths (default: all shipped)")
    t.add_argument("--host-cpu", action="store_true",
                   help="the host_cpu table instead: roofline figures and one expert of --card "
                        "on the CPU vs copied over the expert link")
    t.add_argument("--card", default="deepseek_v2_lite",
                   help="model card for --host-cpu's expert times")
    return p


def main(argv: Sequence[str] | None = None, *, bench: Bench | None = None,
         storage_bench: Any = None, host_cpu_bench: Any = None) -> int:
    """Entry point of ``moesim-profile``; ``bench``/``storage_bench``/``host_cpu_bench`` let
    tests replace the CUDA backend and this machine's disk and CPU."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in or args_in[0] not in (*_COMMANDS, "-h", "--help"):
        args_in.insert(0, "measure")
    args = _parser().parse_args(args_in)
    try:
        if args.cmd == "plot":
            from .report import plot_profiles

            marks = []
            for name in args.mark_card:
                c = load_card(name)
                marks.append((f"{c.name} expert\n{c.expert_bytes / 1e6:.1f} MB", c.expert_bytes))
            for path in plot_profiles(args.profiles, args.out, marks):
                print(f"wrote {path}")
            return 0
        if args.cmd == "table":
            from .report import markdown_table

            if args.host_cpu:
                from .report import host_cpu_table

                print(host_cpu_table(args.profiles or list_profiles(), load_card(args.card)),
                      end="")
                return 0
            print(markdown_table(args.profiles or list_profiles()), end="")
            return 0
        if args.cmd == "storage":
            from .measure_storage import run_cli

            return run_cli(args, args_in, storage_bench)
        if args.cmd == "host-cpu":
            from .measure_host_cpu import run_cli as run_host_cpu

            return run_host_cpu(args, args_in, host_cpu_bench)
        return _measure(args, bench)
    except (ProfileError, ModelCardError, ValueError, OSError) as exc:
        print(f"moesim-profile: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _measure(args: argparse.Namespace, bench: Bench | None) -> int:
    card = load_card(args.model)
    if args.min_bytes <= 0 or args.max_bytes < args.min_bytes:
        raise ValueError("need 0 < --min-bytes <= --max-bytes")
    if bench is None:
        cuda, why = _cuda_bench(args.device)
        if cuda is None:
            print(f"moesim-profile: {why}", file=sys.stderr)
            return EXIT_NO_CUDA
        bench = cuda
    out: Path = args.out or Path(f"{_slug(bench.describe().get('gpu_name', 'gpu'))}.yaml")
    if out.suffix not in (".yaml", ".yml"):
        raise ValueError(f"--out {out}: the profile must be a .yaml file")
    opts = MeasureOptions(
        sizes=default_sizes(args.min_bytes, args.max_bytes),
        batches=tuple(sorted(set(args.batches))),
        contexts=tuple(sorted(set(args.contexts))),
        progress=not args.no_progress,
    )
    if min(opts.batches) < 1 or min(opts.contexts) < 1:
        raise ValueError("--batches and --contexts must be >= 1")
    mapping = run_measurement(bench, card, _slug(out.stem), opts)
    if _slug(out.stem) != out.stem:
        out = out.with_name(f"{_slug(out.stem)}{out.suffix}")
    print(f"wrote {write_profile(mapping, out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
