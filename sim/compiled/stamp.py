"""Drop numba's cached machine code when any compiled module changed.

numba's ``cache=True`` checks only the file that defines a function, but a kernel's cached
code includes every helper it calls from the sibling modules: after editing (or upgrading) one
module, a caller cached from an older version would run the old helper, or crash when the
layout of ``S`` changed. One digest over all of ``sim/compiled/*.py`` is kept beside the cache;
when it differs, the cache files of this package are removed and numba compiles afresh.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_NAME = "moesim_compiled.digest"


def refresh_cache(folder: Path | None = None) -> bool:
    """Remove stale cache files (``__pycache__/*.nbi|nbc``); True if any were removed. Best
    effort: an unwritable cache folder is left as it is (numba then uses its own fallback)."""
    folder = folder or Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    want = digest.hexdigest()
    cache = folder / "__pycache__"
    stamp = cache / _NAME
    try:
        if stamp.read_text() == want:
            return False
    except OSError:
        pass
    removed = False
    try:
        for path in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            path.unlink(missing_ok=True)
            removed = True
        cache.mkdir(exist_ok=True)
        stamp.write_text(want)
    except OSError:
        return removed
    return removed
