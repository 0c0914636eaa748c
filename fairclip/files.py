"""Atomic file writing: a reader never sees a half-written file, whatever the writer does.

Every file fairclip writes that another process may read (reports, exports, SAE weights,
shards' ``sizes.json``, plots) goes through :func:`atomic_path`: the content is written to a
temporary file in the same folder (so the final rename stays on one file system) and moved
into place with :func:`os.replace`, which is atomic on POSIX. On an error the temporary file
is removed and the previous file, if any, is left untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, suffix: str = "", prefix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it to ``path``.

    ``suffix`` is appended to the temporary name for writers that pick a format from it
    (matplotlib's ``savefig`` reads ``.png``); ``prefix`` (default ``.<name>.``) lets a
    caller find its own leftovers after a crash. The file gets mode 0644, as a plain
    ``open()`` under the usual umask would (``mkstemp`` creates it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=prefix or f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
