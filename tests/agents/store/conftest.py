"""Fixtures for the backup store: a fresh store in a private directory on
tmpfs (fsync is cheap there; the crash test uses the disk), and helpers to
back an image up and read it back."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from agents.store import Store, init_dir

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


@pytest.fixture
def store_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix=f"store-test-{os.getpid()}-", dir=SHM)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def store(store_dir: str) -> Iterator[Store]:
    s = init_dir(os.path.join(store_dir, "s"), chunk_size=65536)
    yield s
    s.close()


def backup(store: Store, image: bytes, parent: str | None = None, unchanged: set[int] = frozenset(),
           order: list[int] | None = None, **fields: object) -> str:
    """Back `image` up (chunk indexes in `unchanged` taken from `parent`,
    the others added in `order`, default descending)."""
    cs = store.chunk_size
    w = store.writer(len(image), parent=parent)
    count = -(-len(image) // cs)
    for i in order if order is not None else reversed(range(count)):
        if i in unchanged:
            w.take_from_parent(i * cs)
        else:
            w.add(i * cs, image[i * cs:(i + 1) * cs])
    return w.commit(**fields)


def image_of(store: Store, sid: str) -> bytes:
    out = bytearray()
    for ext in store.iter_image(sid):
        assert ext.offset == len(out)
        out += ext.data if ext.data is not None else bytes(ext.length)
    return bytes(out)


def age_everything(root: str, seconds: float = 3600) -> None:
    """Make every object in the store look `seconds` old (time passing, for gc)."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                st = os.stat(p)
                os.utime(p, (st.st_atime - seconds, st.st_mtime - seconds))
            except FileNotFoundError:       # a concurrent sweep removed it
                pass
