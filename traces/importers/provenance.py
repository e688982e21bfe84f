"""Pick the source repository and licence lines out of a shared-traces ``PROVENANCE.md``.

So that an imported trace carries where it came from without anyone typing it in again.
"""

from __future__ import annotations

import re
from pathlib import Path

_FIELD = re.compile(r"^\s*-\s*(Repository|License)\s*:\s*(.+)$", re.IGNORECASE)


def _clean(text: str, limit: int = 240) -> str:
    text = re.sub(r"[`*]", "", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def provenance(src: Path) -> tuple[str, str]:
    """``(source, license)`` from the nearest PROVENANCE.md at or above ``src`` (2 levels)."""
    start = src if src.is_dir() else src.parent
    for folder in (start, start.parent):
        doc = folder / "PROVENANCE.md"
        if doc.is_file():
            found: dict[str, str] = {}
            for line in doc.read_text(encoding="utf-8", errors="replace").splitlines():
                m = _FIELD.match(line)
                if m and m.group(1).lower() not in found:
                    found[m.group(1).lower()] = _clean(m.group(2))
            return found.get("repository", ""), found.get("license", "")
    return "", ""
