"""Files written whole or not at all.

Every file a run leaves (results, ledgers, models, checkpoints) is written through
:func:`write_atomic`: into a temporary file beside the target, flushed and fsynced, then
renamed over the target. A reader sees the old file or the new one, never a part; a
failure (a full disk, a folder turned read-only) leaves the old file as it was, removes
the temporary one, and raises the ``OSError`` naming the target.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["save_torch", "write_atomic", "write_csv", "write_json", "write_text"]


def write_atomic(path: Path, write: Callable[[IO[bytes]], object], *, mode: int = 0o644) -> None:
    """Write ``path`` with ``write`` (given the open temporary file), atomically.

    Raises ``OSError`` with ``path`` as its file name when the file cannot be written."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON (numbers that JSON lacks, e.g. NumPy's, as floats)."""
    write_text(path, json.dumps(value, indent=2, default=float))


def write_csv(path: Path, fieldnames: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(fieldnames))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


def save_torch(path: Path, value: Any, *, mode: int = 0o644) -> None:
    """``torch.save(value)`` into ``path``, atomically. Serialized in memory first: torch's
    own writer reports a full disk as a RuntimeError about positions, not as ENOSPC."""
    import torch  # here: the ledger's CSV path stays torch-free

    buffer = io.BytesIO()
    torch.save(value, buffer)
    write_atomic(path, lambda f: f.write(buffer.getbuffer()), mode=mode)
