"""Checksummed HTTP(S) downloads that resume, retry and never leave a half-written file.

A transfer goes to ``<dest>.part``. A broken transfer is resumed with a ``Range`` request when
the server answers 206, and restarted from zero when it answers 200. The finished file is
checked against its published md5 and only then renamed onto ``dest``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..errors import ChecksumError, DownloadError

CHUNK_SIZE = 1 << 16
USER_AGENT = "dnnmod-data-fetch"


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def mirror_url(url: str, mirror: str) -> str:
    """Replace everything up to the last '/' of ``url`` with the ``mirror`` base URL."""
    return f"{mirror.rstrip('/')}/{url.rsplit('/', 1)[-1]}"


class _TruncatedTransferError(OSError):
    """The server closed the connection before sending the announced length."""


def fetch(url: str, dest: Path, md5: str | None, *, retries: int = 3, timeout: float = 60,
          progress: bool | None = None, backoff: float = 1.0) -> Path:
    """Download ``url`` to ``dest`` and verify its md5; return ``dest``.

    ``md5=None`` is for files whose checksum is defined on their decompressed content: the
    caller verifies them (and deletes ``dest`` on mismatch). An existing ``dest`` with the
    right checksum is used without network. ``retries`` counts attempts after the first; the
    wait before attempt ``k`` is ``backoff * 2**(k-1)`` seconds. ``progress=None`` shows a
    progress bar only on a terminal.
    """
    dest = Path(dest)
    if dest.is_file():
        if md5 is None or md5_file(dest) == md5:
            return dest
        dest.unlink()  # stale or corrupt: never leave a wrong file where a good one belongs
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _transfer(url, part, timeout, progress)
            break
        except urllib.error.HTTPError as err:
            # Client errors (404, 403) will not heal by retrying; server errors might.
            if 400 <= err.code < 500 and err.code not in (408, 429):
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
            last_error = err
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets
            last_error = err
    else:
        raise DownloadError(
            f"{url}: download failed after {retries + 1} attempts ({last_error}); the partial "
            f"file {part} is kept and the next run resumes it") from None
    if md5 is not None:
        actual = md5_file(part)
        if actual != md5:
            part.unlink(missing_ok=True)
            raise ChecksumError(
                f"{dest.name}: md5 mismatch for {url}: expected {md5}, got {actual}; "
                "the download was deleted")
    with open(part, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(part, dest)
    return dest


def _transfer(url: str, part: Path, timeout: float, progress: bool | None) -> None:
    """One attempt: append to ``part`` from its current size, or restart it from zero."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # Range starts at or beyond the end: the part is complete (or stale); the md5 check
            # decides, and a stale part is then deleted.
            return
        raise
    with response:
        if response.status == 206:
            first = _content_range_start(response.headers.get("Content-Range", ""))
            if first != offset:
                raise _TruncatedTransferError(f"server resumed at byte {first}, expected {offset}")
            mode = "ab"
        else:  # 200: the server ignored the Range header, so start over
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        total = offset + remaining if remaining is not None else None
        received = 0
        with open(part, mode) as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=part.stem,
                disable=None if progress is None else not progress, leave=False) as bar:
            while chunk := response.read(CHUNK_SIZE):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if remaining is not None and received < remaining:
        raise _TruncatedTransferError(f"connection closed after {received} of {remaining} bytes")


def _content_range_start(content_range: str) -> int:
    """First byte of ``Content-Range: bytes START-END/TOTAL``; -1 if unparseable."""
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1
