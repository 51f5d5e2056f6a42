"""Atomic, code-free artifact I/O: safetensors for tensors, JSON for metadata.

Every writer goes through :func:`atomic_write`: the content is written to a temporary file in
the destination directory, given the mode the umask asks for, flushed to disk, then renamed
over the destination. A killed job therefore leaves either the old file or the new one, never
a half-written one that a later step would trust. Its temporary file stays behind; the next
write to the same destination removes it (a temporary file names the host and process that
writes it, so only those of dead writers go). Nothing here unpickles: loading never executes
code from a file.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dnnmod.errors import ArtifactError

if TYPE_CHECKING:
    import torch


#: a temporary file whose writer runs on another host, or whose name does not say its writer
#: (written before names did), is taken for an orphan once it is this old
FOREIGN_ORPHAN_AGE_S = 24 * 3600


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}", suffix=".tmp",
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates files private to the owner (0600), and a writer may have replaced
        # the file (safetensors' save_file does): the mode is set on what gets renamed, the
        # mode any new file gets, so a group sharing a cluster's results can read it.
        with open(tmp_path, "rb+") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_current_umask())
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free
            raise ArtifactError(f"{path}: no space left on the device ({free / 2**20:.0f} MiB "
                                f"free in {path.parent}); nothing was written") from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _writer_tag() -> str:
    """``host~pid~``: who writes a temporary file (the pid at call time: forks differ)."""
    return f"{socket.gethostname()}~{os.getpid()}~"


def remove_orphans(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed writers of ``path`` left beside it; return them.

    A file of a writer on this host goes when that process is gone; one of another host (its
    process cannot be asked) or of unknown writer when older than :data:`FOREIGN_ORPHAN_AGE_S`.
    """
    path = Path(path)
    host, removed = socket.gethostname(), []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        tag = candidate.name[len(path.name) + 2:-len(".tmp")].split("~")
        try:
            if len(tag) == 3 and tag[0] == host and tag[1].isdigit():
                orphan = not _process_alive(int(tag[1]))
            else:
                orphan = time.time() - candidate.stat().st_mtime > FOREIGN_ORPHAN_AGE_S
            if orphan:
                candidate.unlink()
                removed.append(candidate)
        except FileNotFoundError:  # its writer renamed it, or another cleaner was first
            continue
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, *, shared: bool = False) -> Iterator[None]:
    """Hold a lock on ``directory`` for the block: exclusive for the writer of an artifact of
    several files, so that concurrent writers take turns and the last leaves a whole set;
    ``shared`` for its readers, so that none reads a set half replaced. Where the file system
    refuses directory locks (some network file systems), the block runs unlocked: the readers'
    own consistency checks then refuse a mixed set."""
    import fcntl

    if not shared:
        Path(directory).mkdir(parents=True, exist_ok=True)
    elif not Path(directory).is_dir():  # nothing to read: the reader says what is missing
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (stable diffs, stable hashes)."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from None


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> str:
    """Save a flat name→tensor mapping as safetensors (contiguous CPU copies); return the
    SHA-256 of the file written (hashed before it replaces ``path``: another writer's file
    cannot be hashed in its place)."""
    # safetensors.torch imports torch lazily here and below: table and figure jobs read only
    # JSON and CSV, and importing torch costs them about 2 s each.
    from safetensors.torch import save_file

    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_write(path) as tmp:
        save_file(flat, str(tmp), metadata=dict(metadata) if metadata else None)
        return sha256_file(tmp)


def load_tensors(path: str | os.PathLike,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: not a readable safetensors file ({err})") from None


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def config_hash(obj: Any) -> str:
    """Short stable hash of a JSON-serialisable configuration."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
