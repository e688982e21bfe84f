"""Hardware profiles: host-link curves, storage tiers, GPU figures, compute-time models and the
host CPU that can run a missed expert (``host_cpu``).

One YAML per device lives next to this file and doubles as the Hydra config group ``hw``.
Every number carries ``kind`` (measured | spec | estimate) and ``source`` (ids from
shared/notes/hw-and-models.md, a URL, or the measuring command). Schema and shipped profiles:
experiments/docs/pages/hardware-profiles.md.
"""

from .compute import ComputeModel, MeasuredTable
from .host_cpu import HostCpuModel, HostCpuSpec
from .link import LinkModel
from .profile import (
    HwProfile,
    list_profiles,
    load_profile,
    profile_from_mapping,
    profile_path,
)
from .schema import KINDS, ProfileError, Quantity

__all__ = [
    "KINDS",
    "ComputeModel",
    "HostCpuModel",
    "HostCpuSpec",
    "HwProfile",
    "LinkModel",
    "MeasuredTable",
    "ProfileError",
    "Quantity",
    "list_profiles",
    "load_profile",
    "profile_from_mapping",
    "profile_path",
]
