"""Files that are either complete or absent: atomic writes, folders published whole, checksums."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, binary: bool = False):
    """A file handle writing into a temporary file beside `path`, renamed to `path` when the block ends normally:
    readers never see a half file. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    with atomic_file(path, binary=isinstance(data, bytes)) as fh:
        fh.write(data)


def replace_folder(src: Path, dest: Path) -> None:
    """Move the finished folder `src` to `dest`, replacing what was there."""
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(src, dest)


@contextlib.contextmanager
def publish_folder(dest: str | os.PathLike):
    """Yields an empty temporary folder beside `dest` to fill; when the block ends normally, the folder replaces
    `dest`, so `dest` is never a partly written folder."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    replace_folder(tmp, dest)
