"""VolumeManager on a real temporary data directory."""
from __future__ import annotations

import os
import sqlite3
import stat
import time

import pytest

from volumes.errors import BadInput, Conflict, NotFound
from volumes.manager import VolumeManager
from volumes.store import SCHEMA_VERSION, MetadataStore, SchemaTooNew


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def manager(data_dir):
    with VolumeManager(str(data_dir)) as m:
        yield m


def rows(data_dir) -> list[tuple]:
    with sqlite3.connect(data_dir / "splitd.db") as db:
        return db.execute("SELECT name, size, region_size, read_only FROM volumes "
                          "ORDER BY name").fetchall()


def test_layout_and_modes(manager, data_dir):
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(data_dir / "volumes").st_mode) == 0o750
    assert (data_dir / "splitd.db").exists()
    with sqlite3.connect(data_dir / "splitd.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_create_is_sparse(manager, data_dir):
    vol = manager.create("db", "1T")
    st = os.stat(data_dir / "volumes" / "db.img")
    assert vol.path == str(data_dir / "volumes" / "db.img")
    assert st.st_size == 1 << 40
    assert st.st_blocks == 0
    assert manager.allocated_bytes("db") == 0
    assert (vol.name, vol.size, vol.region_size, vol.read_only) == ("db", 1 << 40, 65536, False)
    assert rows(data_dir) == [("db", 1 << 40, 65536, 0)]
    assert manager.get("db") is vol and manager.find("db") is vol


def test_allocated_bytes_follow_writes(manager):
    vol = manager.create("v", "1M")
    vol.write(0, b"x" * 8192)
    assert manager.allocated_bytes("v") >= 8192


def test_create_options(manager, data_dir):
    manager.create("ro", 4096, region_size="1M", read_only=True)
    assert rows(data_dir) == [("ro", 4096, 1 << 20, 1)]
    assert manager.get("ro").read_only


def test_duplicate_is_refused_and_nothing_changes(manager, data_dir):
    vol = manager.create("db", "1M")
    vol.write(0, b"keep")
    with pytest.raises(Conflict, match="already exists"):
        manager.create("db", "2M")
    assert manager.get("db").read(0, 4) == b"keep"
    assert os.path.getsize(vol.path) == 1 << 20
    assert rows(data_dir) == [("db", 1 << 20, 65536, 0)]


@pytest.mark.parametrize("args", [
    ("../escape", "1M"), ("a/b", "1M"), (".x", "1M"), ("", "1M"), (7, "1M"),
    ("ok", "1000"), ("ok", 0), ("ok", "-4K"), ("ok", "1.5M"), ("ok", True),
    ("ok", "1M", "3K"), ("ok", "1M", 1 << 30), ("ok", "1M", 65536, "yes"),
])
def test_invalid_input_writes_nothing(manager, data_dir, args):
    with pytest.raises(BadInput):
        manager.create(*args)
    assert os.listdir(data_dir / "volumes") == []
    assert not (data_dir.parent / "escape.img").exists()
    assert rows(data_dir) == []
    assert manager.list() == []


def test_stray_file_is_refused_and_kept(manager, data_dir):
    stray = data_dir / "volumes" / "old.img"
    stray.write_bytes(b"someone's data")
    with pytest.raises(Conflict, match="move it away"):
        manager.create("old", "1M")
    assert stray.read_bytes() == b"someone's data"
    assert rows(data_dir) == []


def test_failed_insert_removes_the_file(manager, data_dir):
    # A real SQLite failure: a trigger that refuses the row.
    with sqlite3.connect(data_dir / "splitd.db") as db:
        db.execute("CREATE TRIGGER no_rows BEFORE INSERT ON volumes "
                   "BEGIN SELECT RAISE(ABORT, 'refused by test'); END")
    with pytest.raises(sqlite3.DatabaseError, match="refused by test"):
        manager.create("db", "1M")
    assert os.listdir(data_dir / "volumes") == []
    assert manager.find("db") is None


def test_resize_grows_only(manager, data_dir):
    vol = manager.create("db", "1G")
    vol.write(4096, b"data")
    assert manager.resize("db", "2G") is vol
    assert vol.size == 2 << 30
    assert os.path.getsize(vol.path) == 2 << 30
    assert rows(data_dir) == [("db", 2 << 30, 65536, 0)]
    assert vol.read(4096, 4) == b"data"
    manager.resize("db", 2 << 30)  # same size: nothing to do
    with pytest.raises(BadInput, match="only grow"):
        manager.resize("db", "1G")
    with pytest.raises(BadInput, match="multiple of 4096"):
        manager.resize("db", (2 << 30) + 1)
    with pytest.raises(NotFound):
        manager.resize("nope", "4G")
    assert vol.size == 2 << 30 and rows(data_dir) == [("db", 2 << 30, 65536, 0)]


def test_resize_read_only_volume(manager):
    manager.create("ro", "1M", read_only=True)
    manager.resize("ro", "2M")
    assert os.path.getsize(manager.get("ro").path) == 2 << 20


def test_delete(manager, data_dir):
    vol = manager.create("db", "1M")
    manager.create("other", "1M")
    manager.delete("db")
    assert vol.fd == -1
    assert not os.path.exists(vol.path)
    assert manager.find("db") is None
    assert [v.name for v in manager.list()] == ["other"]
    assert rows(data_dir) == [("other", 1 << 20, 65536, 0)]
    with pytest.raises(NotFound):
        manager.delete("db")
    with pytest.raises(NotFound):
        manager.get("db")
    manager.create("db", "2M")  # the name is free again
    assert manager.get("db").size == 2 << 20


def test_list_is_sorted(manager):
    for name in ["b", "C", "a", "a.1", "0"]:
        manager.create(name, 4096)
    assert [v.name for v in manager.list()] == ["0", "C", "a", "a.1", "b"]


def test_reload_after_reopen(data_dir):
    with VolumeManager(str(data_dir)) as m:
        m.create("a", "1G", region_size="4K")
        m.create("b", "64M", read_only=True)
        m.get("a").write(1 << 20, b"persisted")
        m.resize("a", "3G")
    with VolumeManager(str(data_dir)) as m:
        a, b = m.list()
        assert (a.name, a.size, a.region_size, a.read_only) == ("a", 3 << 30, 4096, False)
        assert (b.name, b.size, b.region_size, b.read_only) == ("b", 64 << 20, 65536, True)
        assert a.fd >= 0 and b.fd >= 0
        assert a.read(1 << 20, 9) == b"persisted"


def test_one_daemon_per_data_dir(manager, data_dir):
    with pytest.raises(Conflict, match="in use by another splitd"):
        VolumeManager(str(data_dir))
    manager.close()
    VolumeManager(str(data_dir)).close()


def test_missing_file_makes_one_volume_unavailable(data_dir):
    with VolumeManager(str(data_dir)) as m:
        m.create("gone", "1M")
        m.create("fine", "1M")
    os.unlink(data_dir / "volumes" / "gone.img")
    with VolumeManager(str(data_dir)) as m:
        assert [v.name for v in m.list()] == ["fine"]
        assert "gone" in m.unavailable
        with pytest.raises(NotFound, match="unavailable"):
            m.get("gone")
        with pytest.raises(Conflict):
            m.create("gone", "1M")
        m.delete("gone")  # forgetting it is still possible
        assert m.unavailable == {}
        m.create("gone", "1M")


def test_a_hundred_terabyte_volumes_list_fast(manager):
    for i in range(100):
        manager.create(f"vol{i:03d}", "1T")
    started = time.monotonic()
    listed = [(v.name, v.size, manager.allocated_bytes(v.name)) for v in manager.list()]
    assert time.monotonic() - started < 0.1
    assert len(listed) == 100 and all(a == 0 for _, _, a in listed)


def test_store_refuses_a_newer_schema(tmp_path):
    path = str(tmp_path / "splitd.db")
    MetadataStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNew):
        MetadataStore(path)


def test_store_transaction_is_all_or_nothing(tmp_path):
    store = MetadataStore(str(tmp_path / "splitd.db"))
    store.add_volume("a", 4096, 65536, False)
    with pytest.raises(RuntimeError):
        with store.transaction() as db:
            db.execute("UPDATE volumes SET size = 8192 WHERE name = 'a'")
            raise RuntimeError("half way")
    assert store.get_volume("a").size == 4096
    store.set_volume_size("a", 8192)  # the store is usable after the rollback
    assert store.get_volume("a").size == 8192
    store.close()
