"""Human-facing views of profiles: the bandwidth-curve figure, the key-figure markdown table and
the host-CPU table (each profile's ``host_cpu`` roofline and one expert on the CPU vs copied)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from moesim.traces.model_card import ModelCard

from .link import LinkModel
from .profile import HwProfile, load_profile
from .schema import Quantity

_URL = re.compile(r"https?://(?:www\.)?([^/\s;,)]+)")
_SOURCE_ID = re.compile(r"\bS\d+\b")


def _sizes(lo: float = 1e3, hi: float = 1e9, n: int = 200) -> list[int]:
    step = (math.log10(hi) - math.log10(lo)) / (n - 1)
    return sorted({round(10 ** (math.log10(lo) + i * step)) for i in range(n)})


def effective_bandwidth(link: LinkModel, nbytes: int) -> float:
    """Bytes/s including the per-copy latency, i.e. what one copy of that size really gets."""
    return nbytes / link.transfer_time(nbytes)


def plot_profiles(
    profiles: Sequence[str | Path],
    out: Sequence[str | Path],
    mark_bytes: Sequence[tuple[str, int]] = (),
) -> list[Path]:
    """Overlay each profile's expert-link bandwidth curve; write PNG and/or PDF by suffix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moesim.experiments.plot_style import savefig  # TrueType fonts in the PDF

    loaded = [load_profile(p) for p in profiles]
    sizes = _sizes()
    fig, ax = plt.subplots(figsize=(7.2, 4.3), dpi=100)
    unified_styles = iter(["--", "-.", ":"] * len(loaded))
    for prof in loaded:
        link = prof.expert_link()
        style = next(unified_styles) if prof.unified_memory else "-"
        label = f"{prof.name}: {_link_label(prof)}"
        (line,) = ax.plot(
            sizes, [effective_bandwidth(link, s) / 1e9 for s in sizes], style, lw=1.6, label=label
        )
        if link.curve:
            ax.plot([s for s, _ in link.curve], [effective_bandwidth(link, s) / 1e9
                    for s, _ in link.curve], "o", ms=3, color=line.get_color())
    for text, nbytes in mark_bytes:
        ax.axvline(nbytes, color="0.5", lw=0.8, ls=":")
        ax.text(nbytes * 1.1, 0.75, text, transform=ax.get_xaxis_transform(), fontsize=7,
                va="top", color="0.3")
    ax.set_xscale("log")
    ax.set_xlabel("transfer size per copy (bytes, log scale)")
    ax.set_ylabel("effective bandwidth (GB/s = 1e9 B/s)")
    ax.set_title("Bandwidth of one expert copy: host-to-device (solid), NVMe-to-DRAM on "
                 "unified memory (dashed);\ndots = measured curve points, lines = the simulator's "
                 "LinkModel incl. latency", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper left", framealpha=0.9)
    fig.tight_layout()
    written = []
    for path in map(Path, out):
        if path.suffix.lower() not in (".png", ".pdf"):
            raise ValueError(f"--out {path}: use a .png or .pdf file name")
        path.parent.mkdir(parents=True, exist_ok=True)
        savefig(fig, path, metadata={"Software": None} if path.suffix.lower() == ".png" else None)
        written.append(path)
    plt.close(fig)
    return written


def _link_label(prof: HwProfile) -> str:
    if prof.unified_memory:
        assert prof.storage is not None
        q = prof.storage.link.peak_bandwidth_Bps
        return f"{prof.storage.medium} read {_gbps(q)} ({q.kind})"
    assert prof.host_link is not None
    spec = prof.host_link.pinned if prof.host_link.host_memory == "pinned" else (
        prof.host_link.pageable)
    assert spec is not None
    shape = "measured curve" if spec.curve.known else "latency + peak"
    q = spec.peak_bandwidth_Bps
    return f"H2D {prof.host_link.host_memory} {_gbps(q)}, {shape} ({q.kind})"


def _gbps(q: Quantity) -> str:
    return f"{float(q.value) / 1e9:.3g} GB/s" if q.known else "?"


# --------------------------------------------------------------------------------------------
# Markdown table


def _cite(q: Quantity) -> str:
    ids = sorted(set(_SOURCE_ID.findall(q.source)), key=lambda s: int(s[1:]))
    url = _URL.search(q.source)
    if ids:
        where = ", ".join(ids)
    elif q.source.startswith("moesim-profile") or "; moesim-profile" in q.source:
        where = "moesim-profile"
    elif url:  # a figure sourced straight from a page: its site, not a vague "notes"
        where = url.group(1)
    else:
        where = "notes"
    return f"{q.kind}; {where}"


def _cell(q: Quantity | None, scale: float, fmt: str, unit: str) -> str:
    if q is None or not q.known:
        return "null (not found)"
    num = format(float(q.value) / scale, fmt)
    return f"{num} {unit} ({_cite(q)})".replace("  (", " (")


def table_rows(prof: HwProfile) -> list[str]:
    g = prof.gpu
    if prof.host_link is not None:
        spec = prof.host_link.pinned
        h2d = _cell(spec.peak_bandwidth_Bps, 1e9, ".4g", "GB/s")
        if spec.curve.known:
            h2d += " + curve"
        lat = _cell(spec.latency_s, 1e-6, ".3g", "µs")
        engines = _cell(prof.host_link.copy_engines, 1, ".0f", "")
    else:
        h2d, lat, engines = "none (unified memory)", "–", "–"
    bw = (g.memory_bandwidth_measured_Bps if g.memory_bandwidth_measured_Bps.known
          else g.memory_bandwidth_Bps)
    bw_txt = _cell(bw, 1e9, ".4g", "GB/s")
    if g.memory_bandwidth_measured_Bps.known and g.memory_bandwidth_Bps.known:
        bw_txt += f"; spec {float(g.memory_bandwidth_Bps.value) / 1e9:.4g}"
    fl = g.fp16_flops_measured if g.fp16_flops_measured.known else g.fp16_flops
    fl_txt = _cell(fl, 1e12, ".4g", "")
    if g.fp16_flops_measured.known and g.fp16_flops.known:
        fl_txt += f"; peak {float(g.fp16_flops.value) / 1e12:.4g}"
    if prof.storage is not None:
        st = f"{prof.storage.medium} " + _cell(prof.storage.link.peak_bandwidth_Bps, 1e9, ".3g",
                                               "GB/s")
    else:
        st = "none"
    mem = _cell(g.memory_bytes, 2**30, ".0f", "GiB")
    return [f"`{prof.name}`", h2d, lat, engines, mem, bw_txt, fl_txt, st]


def markdown_table(profiles: Sequence[str | Path]) -> str:
    header = ["profile", "H2D pinned (expert link)", "latency_s", "copy engines", "GPU memory",
              "memory BW (measured, else spec)", "fp16 TFLOPS (measured, else peak)",
              "storage tier"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in profiles:
        lines.append("| " + " | ".join(table_rows(load_profile(p))) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Host CPU table (``moesim-profile table --host-cpu``)


def _eff(figure: Quantity, efficiency: Quantity, scale: float, unit: str) -> str:
    """'value x efficiency = effective unit (kinds; sources)' for a roofline figure."""
    if not figure.known:
        return "null (not found)"
    eff = float(efficiency.value)
    x = float(figure.value) / scale
    kinds = "/".join(sorted({str(figure.kind), str(efficiency.kind)}))
    return f"{x:.4g} × {eff:.3g} = {x * eff:.3g} {unit} ({kinds})"


def host_cpu_rows(prof: HwProfile, card: ModelCard) -> list[str]:
    """One row: the host CPU's roofline figures and one expert of ``card`` on it vs copied."""
    hc = prof.host_cpu
    if hc is None:
        return [f"`{prof.name}`", "none", "–", "–", "–", "–", "–", "–"]
    bw = (hc.memory_bandwidth_measured_Bps if hc.memory_bandwidth_measured_Bps.known
          else hc.memory_bandwidth_Bps)
    fl = hc.flops_measured if hc.flops_measured.known else hc.flops
    model = hc.model(card)
    ovh = hc.per_expert_overhead_s
    copy = prof.expert_link().transfer_time(card.expert_bytes)
    times = " / ".join(f"{model.expert_time(t) * 1e3:.3g}" for t in (1, 16, 64))
    return [
        f"`{prof.name}`",
        hc.cpu,
        f"{int(hc.cores.value)} ({int(hc.parallel.value)})",
        _eff(bw, hc.memory_efficiency, 1e9, "GB/s"),
        _eff(fl, hc.flops_efficiency, 1e12, "TFLOP/s"),
        f"{float(ovh.value) * 1e6:.3g} µs ({ovh.kind})",
        times + ("" if model.measured is None else " (measured table)"),
        f"{copy * 1e3:.3g}",
    ]


def host_cpu_table(profiles: Sequence[str | Path], card: ModelCard) -> str:
    """Markdown: each profile's host CPU and one ``card`` expert on it vs over the expert link."""
    header = ["profile", "host CPU", "cores (parallel)", "memory BW × efficiency",
              "FLOP/s × efficiency", "overhead / expert",
              f"{card.name} expert on CPU, ms at 1 / 16 / 64 tokens",
              "same expert copied, ms"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in profiles:
        lines.append("| " + " | ".join(host_cpu_rows(load_profile(p), card)) + " |")
    return "\n".join(lines) + "\n"
