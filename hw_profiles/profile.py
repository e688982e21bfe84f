"""Hardware profiles: one YAML per device, validated on load, turned into link and compute models.

The same YAML files form the Hydra config group ``hw`` (``hw=v100_pcie``), so the loader accepts
both a file (strict: every number must carry ``kind`` and ``source``) and the resolved mapping
Hydra hands over (which may contain bare command-line overrides such as
``hw.host_link.copy_engines=2``). Schema: experiments/docs/pages/hardware-profiles.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from moesim.traces.model_card import ModelCard

from .compute import ComputeModel, MeasuredTable, parse_measured_table
from .host_cpu import HostCpuModel, HostCpuSpec, parse_host_cpu
from .link import LinkModel
from .schema import (
    Ctx,
    ProfileError,
    Quantity,
    as_bool,
    as_mapping,
    as_str,
    curve_quantity,
    load_yaml,
    missing,
    quantity,
    reject_unknown,
    series_quantity,
)

PROFILES_DIR = Path(__file__).parent
HOST_MEMORY = ("pinned", "pageable")
GPU_MEMORY_MIN_BYTES = 2**30  # plausibility: no GPU an expert cache is simulated on has less
TOP_KEYS = frozenset(
    {"name", "device", "description", "unified_memory", "gpu", "host_link", "storage", "compute",
     "machine", "contention", "host_cpu"}
)


@dataclass(frozen=True)
class LinkSpec:
    """The numbers behind one path. The curve gives the shape; the peak, if given, its plateau."""

    peak_bandwidth_Bps: Quantity
    latency_s: Quantity
    curve: Quantity

    @property
    def usable(self) -> bool:
        return self.peak_bandwidth_Bps.known or self.curve.known

    def model(self, name: str, copy_engines: int) -> LinkModel:
        """A LinkModel; a null latency means 0 (documented: not found, small vs whole experts)."""
        if not self.usable:
            raise ProfileError(f"{name}: link has neither peak_bandwidth_Bps nor curve")
        latency = float(self.latency_s.value) if self.latency_s.known else 0.0
        curve = self.curve.value if self.curve.known else ()
        curve_peak = max((b for _, b in curve), default=0.0)
        link = LinkModel(name, latency, curve, curve_peak or self.peak_bandwidth_Bps.value,
                         copy_engines)
        if curve and self.peak_bandwidth_Bps.known:  # the peak sets the plateau of the shape
            link = link.scaled_to_peak(float(self.peak_bandwidth_Bps.value))
        return link


@dataclass(frozen=True)
class HostLinkSpec:
    bus: str
    host_memory: str
    copy_engines: Quantity
    pinned: LinkSpec
    pageable: LinkSpec | None
    per_copy_overhead_s: Quantity
    sync_call_overhead_s: Quantity


def _interp(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Linear between points, clamped at both ends."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in pairwise(points):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


@dataclass(frozen=True)
class StorageSpec:
    """Storage -> DRAM reads. ``readers_bandwidth_Bps`` is ``((readers, aggregate B/s), ...)``
    from concurrent-reader runs (informational; ``copy_engines`` and the peak come from it)."""

    medium: str
    copy_engines: Quantity
    link: LinkSpec
    per_copy_overhead_s: Quantity = field(default_factory=lambda: missing("per_copy_overhead_s"))
    readers_bandwidth_Bps: Quantity = field(
        default_factory=lambda: missing("readers_bandwidth_Bps"))

    def engine_share(self, engines: int) -> float:
        """Each engine's bandwidth with ``engines`` readers busy, over one reader alone.

        ``aggregate(k) / (k * aggregate(1))`` from ``readers_bandwidth_Bps`` (linear between
        measured reader counts, the aggregate held flat beyond the last), so the simulator's
        ``engines`` fixed-rate engines reproduce the measured aggregate when all are busy. The
        curve itself is the one-reader curve. 1.0 without a table that includes one reader.
        """
        q = self.readers_bandwidth_Bps
        if not q.known or q.value[0][0] != 1 or engines <= 1:
            return 1.0
        return _interp(q.value, engines) / (engines * q.value[0][1])


@dataclass(frozen=True)
class ContentionSpec:
    """Measured interference between copy workers and compute on a shared CPU.

    ``compute_slowdown_under_io``: ``((readers, factor), ...)``, expert-FFN time while that many
    reader threads read, over its time alone. ``read_slowdown_under_compute``: ``((readers,
    factor), ...)``, the readers' time per byte while an FFN loop runs, over alone. The simulator
    does not apply them (yet); they exist so a validation can test whether modelling contention
    reduces the prediction error.
    """

    compute_slowdown_under_io: Quantity
    read_slowdown_under_compute: Quantity
    notes: str = ""

    @staticmethod
    def _factor(q: Quantity, readers: float) -> float:
        if readers <= 0 or not q.known:
            return 1.0
        return _interp(q.value, readers)

    def compute_slowdown(self, readers: float) -> float:
        """FFN time multiplier with ``readers`` busy readers (1.0 for none or unknown)."""
        return self._factor(self.compute_slowdown_under_io, readers)

    def read_slowdown(self, readers: float) -> float:
        """Read time multiplier for ``readers`` readers beside compute (1.0 if unknown)."""
        return self._factor(self.read_slowdown_under_compute, readers)


@dataclass(frozen=True)
class GpuSpec:
    memory_bytes: Quantity
    memory_bandwidth_Bps: Quantity
    memory_bandwidth_measured_Bps: Quantity
    fp16_flops: Quantity
    fp16_flops_measured: Quantity


@dataclass(frozen=True)
class ComputeSpec:
    memory_efficiency: Quantity
    flops_efficiency: Quantity
    measured: Mapping[str, MeasuredTable] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class HwProfile:
    """One device: its host link (or storage tier), GPU figures and compute calibration."""

    name: str
    device: str
    unified_memory: bool
    gpu: GpuSpec
    host_link: HostLinkSpec | None
    storage: StorageSpec | None
    compute: ComputeSpec
    description: str = ""
    machine: Mapping[str, Any] = field(default_factory=dict, compare=False)
    path: Path | None = field(default=None, compare=False)
    contention: ContentionSpec | None = None
    host_cpu: HostCpuSpec | None = None  # the host CPU that can run a missed expert (host_cpu.py)

    @property
    def gpu_memory_bytes(self) -> int | None:
        q = self.gpu.memory_bytes
        return int(q.value) if q.known else None

    @property
    def effective_memory_bandwidth_Bps(self) -> float:
        """Measured if the profile has it, else spec x memory_efficiency."""
        g = self.gpu
        if g.memory_bandwidth_measured_Bps.known:
            return float(g.memory_bandwidth_measured_Bps.value)
        return float(g.memory_bandwidth_Bps.value) * float(self.compute.memory_efficiency.value)

    @property
    def effective_flops(self) -> float:
        g = self.gpu
        if g.fp16_flops_measured.known:
            return float(g.fp16_flops_measured.value)
        return float(g.fp16_flops.value) * float(self.compute.flops_efficiency.value)

    def host_link_model(self, host_memory: str | None = None) -> LinkModel:
        """Host->GPU copies from pinned or pageable host memory (default: the profile's choice)."""
        if self.host_link is None:
            raise ProfileError(f"{self.name}: unified-memory device has no host link")
        hl = self.host_link
        memory = host_memory or hl.host_memory
        spec = hl.pinned if memory == "pinned" else hl.pageable
        if spec is None or not spec.usable:
            raise ProfileError(f"{self.name}: host_link.{memory} has no bandwidth figure")
        return spec.model(f"{self.name}:h2d-{memory}", int(hl.copy_engines.value))

    def storage_link(self) -> LinkModel | None:
        """Storage -> DRAM reads, if the profile has a storage tier with a bandwidth."""
        if self.storage is None or not self.storage.link.usable:
            return None
        medium = self.storage.medium or "storage"
        engines = int(self.storage.copy_engines.value)
        link = self.storage.link.model(f"{self.name}:{medium}->dram", engines)
        share = self.storage.engine_share(engines)
        if share != 1.0:
            link = link.scaled_to_peak(link.peak_bandwidth_Bps * share)
        return link

    def expert_link(self) -> LinkModel:
        """The path a missed expert travels: H2D on discrete GPUs, storage->DRAM on unified."""
        if self.unified_memory:
            link = self.storage_link()
            if link is None:  # excluded by validation; kept for hand-built profiles
                raise ProfileError(f"{self.name}: unified-memory profile needs a storage tier")
            return link
        return self.host_link_model()

    def compute_model(self, card: ModelCard) -> ComputeModel:
        """Times for ``card``: its measured table if it was measured at the card's shape.

        A table measured at another shape (a scaled card, another dtype) is not used; the
        roofline answers instead and ``calibration()`` says why.
        """
        table = self.compute.measured.get(card.name)
        skipped = table.mismatch(card) if table is not None else ""
        return ComputeModel(
            card=card,
            memory_bandwidth_Bps=self.effective_memory_bandwidth_Bps,
            flops=self.effective_flops,
            measured=None if skipped else table,
            profile=self.name,
            skipped=skipped,
        )

    def host_cpu_model(self, card: ModelCard) -> HostCpuModel:
        """Per-expert times of ``card`` on the host CPU (``host_cpu.HostCpuSpec.model``)."""
        if self.host_cpu is None:
            raise ProfileError(f"{self.name}: profile has no host_cpu section")
        return self.host_cpu.model(card)

    def quantities(self) -> Iterator[Quantity]:
        """Every number in the profile (for provenance listings and tests)."""
        yield from _walk(self)


def _walk(obj: Any) -> Iterator[Quantity]:
    if isinstance(obj, Quantity):
        yield obj
    elif is_dataclass(obj):
        for f in fields(obj):
            yield from _walk(getattr(obj, f.name))
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _walk(v)


# --------------------------------------------------------------------------------------------
# Parsing


def _link_spec(ctx: Ctx, data: Mapping[str, Any], extra: set[str] | None = None) -> LinkSpec:
    reject_unknown(ctx, data, {"peak_bandwidth_Bps", "latency_s", "curve", *(extra or set())})
    return LinkSpec(
        peak_bandwidth_Bps=quantity(ctx.sub("peak_bandwidth_Bps"), data.get("peak_bandwidth_Bps"),
                                    "Bps"),
        latency_s=quantity(ctx.sub("latency_s"), data.get("latency_s"), "s", positive=False),
        curve=curve_quantity(ctx.sub("curve"), data.get("curve")),
    )


def _host_link(ctx: Ctx, data: Mapping[str, Any]) -> HostLinkSpec:
    reject_unknown(ctx, data, {"bus", "host_memory", "copy_engines", "pinned", "pageable",
                               "per_copy_overhead_s", "sync_call_overhead_s"})
    host_memory = as_str(ctx.sub("host_memory"), data.get("host_memory"), default="pinned")
    if host_memory not in HOST_MEMORY:
        raise ctx.sub("host_memory").error(f"must be one of {list(HOST_MEMORY)}", host_memory)
    pinned_raw = as_mapping(ctx.sub("pinned"), data.get("pinned"), required=True)
    assert pinned_raw is not None
    pinned = _link_spec(ctx.sub("pinned"), pinned_raw)
    if not pinned.usable:
        raise ctx.sub("pinned").error("needs peak_bandwidth_Bps or curve")
    pageable_raw = as_mapping(ctx.sub("pageable"), data.get("pageable"))
    pageable = _link_spec(ctx.sub("pageable"), pageable_raw) if pageable_raw else None
    if host_memory == "pageable" and (pageable is None or not pageable.usable):
        raise ctx.sub("host_memory").error(
            "is 'pageable' but host_link.pageable has no bandwidth figure", host_memory
        )
    return HostLinkSpec(
        bus=as_str(ctx.sub("bus"), data.get("bus")),
        host_memory=host_memory,
        copy_engines=quantity(ctx.sub("copy_engines"), data.get("copy_engines"), "count",
                              required=True),
        pinned=pinned,
        pageable=pageable,
        per_copy_overhead_s=quantity(ctx.sub("per_copy_overhead_s"),
                                     data.get("per_copy_overhead_s"), "s", positive=False),
        sync_call_overhead_s=quantity(ctx.sub("sync_call_overhead_s"),
                                      data.get("sync_call_overhead_s"), "s", positive=False),
    )


def _storage(ctx: Ctx, data: Mapping[str, Any]) -> StorageSpec:
    link = _link_spec(ctx, data, extra={"medium", "copy_engines", "per_copy_overhead_s",
                                        "readers_bandwidth_Bps"})
    return StorageSpec(
        medium=as_str(ctx.sub("medium"), data.get("medium"), default="storage"),
        copy_engines=quantity(ctx.sub("copy_engines"), data.get("copy_engines"), "count",
                              required=True),
        link=link,
        per_copy_overhead_s=quantity(ctx.sub("per_copy_overhead_s"),
                                     data.get("per_copy_overhead_s"), "s", positive=False),
        readers_bandwidth_Bps=series_quantity(ctx.sub("readers_bandwidth_Bps"),
                                              data.get("readers_bandwidth_Bps"), "Bps",
                                              whole_x=True),
    )


def _contention(ctx: Ctx, data: Mapping[str, Any]) -> ContentionSpec:
    keys = ("compute_slowdown_under_io", "read_slowdown_under_compute")
    reject_unknown(ctx, data, {*keys, "notes"})
    q = {k: series_quantity(ctx.sub(k), data.get(k), "factor", whole_x=True) for k in keys}
    return ContentionSpec(notes=as_str(ctx.sub("notes"), data.get("notes")), **q)


def _gpu(ctx: Ctx, data: Mapping[str, Any]) -> GpuSpec:
    keys = ("memory_bytes", "memory_bandwidth_Bps", "memory_bandwidth_measured_Bps",
            "fp16_flops", "fp16_flops_measured")
    reject_unknown(ctx, data, set(keys))
    dims = {"memory_bytes": "bytes", "memory_bandwidth_Bps": "Bps",
            "memory_bandwidth_measured_Bps": "Bps", "fp16_flops": "flops",
            "fp16_flops_measured": "flops"}
    q = {k: quantity(ctx.sub(k), data.get(k), dims[k]) for k in keys}
    mem = q["memory_bytes"]
    if mem.known and mem.value < GPU_MEMORY_MIN_BYTES:
        raise ctx.sub("memory_bytes").sub("value").error(
            f"{mem.value:.3g} bytes is below the plausible 1 GiB of a GPU (check the value and "
            "its unit)", data["memory_bytes"])
    if not (q["memory_bandwidth_Bps"].known or q["memory_bandwidth_measured_Bps"].known):
        raise ctx.sub("memory_bandwidth_Bps").error(
            "a spec or a measured memory bandwidth is required (memory_bandwidth_Bps or "
            "memory_bandwidth_measured_Bps)"
        )
    if not (q["fp16_flops"].known or q["fp16_flops_measured"].known):
        raise ctx.sub("fp16_flops").error(
            "a spec or a measured fp16 throughput is required (fp16_flops or fp16_flops_measured)"
        )
    return GpuSpec(**q)


def _compute(ctx: Ctx, data: Mapping[str, Any]) -> ComputeSpec:
    reject_unknown(ctx, data, {"memory_efficiency", "flops_efficiency", "measured"})
    measured_raw = as_mapping(ctx.sub("measured"), data.get("measured")) or {}
    measured = {}
    for card, table in measured_raw.items():
        tctx = ctx.sub("measured").sub(str(card))
        table_map = as_mapping(tctx, table, required=True)
        assert table_map is not None
        measured[str(card)] = parse_measured_table(tctx, str(card), table_map)
    return ComputeSpec(
        memory_efficiency=quantity(ctx.sub("memory_efficiency"), data.get("memory_efficiency"),
                                   "ratio", required=True),
        flops_efficiency=quantity(ctx.sub("flops_efficiency"), data.get("flops_efficiency"),
                                  "ratio", required=True),
        measured=measured,
    )


def _to_plain(data: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (resolving interpolations)."""
    if type(data).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(data, resolve=True)
    return data


def _parse(data: Any, name: str, where: str, allow_bare: bool, path: Path | None) -> HwProfile:
    ctx = Ctx(where, "", allow_bare)
    data = _to_plain(data)
    if not isinstance(data, Mapping):
        raise ProfileError(f"{where}: expected a mapping at top level, got {type(data).__name__}")
    reject_unknown(ctx, data, TOP_KEYS)
    declared = as_str(ctx.sub("name"), data.get("name"), default=name)
    if path is not None and declared != path.stem:
        raise ctx.sub("name").error(f"does not match the file name {path.stem!r}", declared)
    unified = as_bool(ctx.sub("unified_memory"), data.get("unified_memory"))
    gpu_raw = as_mapping(ctx.sub("gpu"), data.get("gpu"), required=True)
    compute_raw = as_mapping(ctx.sub("compute"), data.get("compute"), required=True)
    assert gpu_raw is not None and compute_raw is not None
    host_raw = as_mapping(ctx.sub("host_link"), data.get("host_link"))
    storage_raw = as_mapping(ctx.sub("storage"), data.get("storage"))
    if unified and host_raw is not None:
        raise ctx.sub("host_link").error(
            "unified_memory devices have no PCIe copy for weights; remove host_link "
            "(missed experts come from 'storage')"
        )
    if not unified and host_raw is None:
        raise ctx.sub("host_link").error("is required unless unified_memory: true")
    storage = _storage(ctx.sub("storage"), storage_raw) if storage_raw is not None else None
    if unified and (storage is None or not storage.link.usable):
        raise ctx.sub("storage").error(
            "unified_memory devices need a storage tier with peak_bandwidth_Bps or curve"
        )
    machine = as_mapping(ctx.sub("machine"), data.get("machine")) or {}
    contention_raw = as_mapping(ctx.sub("contention"), data.get("contention"))
    host_cpu_raw = as_mapping(ctx.sub("host_cpu"), data.get("host_cpu"))
    return HwProfile(
        name=declared,
        device=as_str(ctx.sub("device"), data.get("device"), required=True),
        description=as_str(ctx.sub("description"), data.get("description")),
        unified_memory=unified,
        gpu=_gpu(ctx.sub("gpu"), gpu_raw),
        host_link=_host_link(ctx.sub("host_link"), host_raw) if host_raw is not None else None,
        storage=storage,
        compute=_compute(ctx.sub("compute"), compute_raw),
        machine=dict(machine),
        path=path,
        contention=(_contention(ctx.sub("contention"), contention_raw)
                    if contention_raw is not None else None),
        host_cpu=(parse_host_cpu(ctx.sub("host_cpu"), host_cpu_raw, declared)
                  if host_cpu_raw is not None else None),
    )


def profile_from_mapping(
    data: Mapping[str, Any], name: str = "<mapping>", *, allow_bare: bool = True
) -> HwProfile:
    """Build a profile from a parsed mapping (e.g. Hydra's resolved ``cfg.hw``).

    ``allow_bare`` accepts plain numbers where a ``{value, kind, source}`` mapping belongs,
    which is what a command-line override produces; they are read in the field's base unit
    and recorded with ``kind: override``.
    """
    return _parse(data, name, name, allow_bare, None)


def list_profiles() -> list[str]:
    """Names of the profile YAMLs shipped in hw_profiles/ and in plugins (moesim.plugins)."""
    from moesim.plugins import profile_files

    return sorted(profile_files("moesim.hw_profiles", PROFILES_DIR))


def profile_path(name: str) -> Path:
    from moesim.plugins import profile_files

    path = profile_files("moesim.hw_profiles", PROFILES_DIR).get(name, PROFILES_DIR / "-")
    if not path.is_file():
        raise ProfileError(
            f"hardware profile {name!r} not found; known profiles: {', '.join(list_profiles())}"
        )
    return path


def load_profile(name_or_path: str | Path) -> HwProfile:
    """Load by name (``v100_pcie``) or path; files must give provenance for every number."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = profile_path(str(name_or_path))
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile file")
    data = load_yaml(path.read_text(encoding="utf-8"), str(path))
    return _parse(data, path.stem, str(path), allow_bare=False, path=path)


__all__ = [
    "ComputeSpec",
    "ContentionSpec",
    "GpuSpec",
    "HostCpuModel",
    "HostCpuSpec",
    "HostLinkSpec",
    "HwProfile",
    "LinkSpec",
    "StorageSpec",
    "list_profiles",
    "load_profile",
    "profile_from_mapping",
    "profile_path",
]
