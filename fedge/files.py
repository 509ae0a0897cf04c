"""Files fedge writes: atomically, so that a reader (or a resumed run) never sees half of one,
and into one cache folder for data it parses or synthesises once (`cache_dir`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_dir(*parts: str) -> Path:
    """fedge's cache: $FEDGE_CACHE_DIR, else $XDG_CACHE_HOME/fedge, else ~/.cache/fedge."""
    root = os.environ.get("FEDGE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fedge"
    )
    return Path(root, *parts)
