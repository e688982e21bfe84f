"""Hardware profiles: host-link curves, storage tiers, GPU figures and compute-time models.

One YAML per device lives next to this file and doubles as the Hydra config group ``hw``.
Every number carries ``kind`` (measured | spec | estimate) and ``source`` (ids from
shared/notes/hw-and-models.md). See README_section.md for the schema and the shipped profiles.
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
