"""AdminClient against the real admin server and Controller, in this process.

The server runs on the test's event loop; the blocking client runs in a
thread (asyncio.to_thread), as splitctl would from another process.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat

import pytest

from controller.service import Controller
from daemon.admin_server import MAX_LINE, start_admin_server
from daemon.connections import ConnectionRegistry
from splitctl.client import AdminClient, AdminError
from volumes.manager import VolumeManager


class NbdConnectionStandIn:
    """What the registry needs of an NBD connection: something to close, and
    its read counters."""

    def __init__(self):
        self.closed_because: str | None = None
        self.read_requests = self.read_bytes = 0

    def close_now(self, reason: str) -> None:
        self.closed_because = reason


class Admin:
    def __init__(self, tmp_path):
        self.socket_path = str(tmp_path / "admin.sock")
        self.manager = VolumeManager(str(tmp_path / "data"))
        self.registry = ConnectionRegistry()
        self.info_fails = False
        self.controller = Controller(self.manager, self.registry, self.info)
        self.client = AdminClient(self.socket_path)

    def info(self) -> dict:
        if self.info_fails:
            raise RuntimeError("boom")
        return {"version": "test", "pid": os.getpid(), "uptime_s": 1.5,
                "listeners": [{"uri": "unix:/nowhere"}]}

    async def call(self, method: str, **params):
        return await asyncio.to_thread(self.client.call, method, **params)

    async def fails(self, code: str, method: str, **params) -> str:
        with pytest.raises(AdminError) as e:
            await self.call(method, **params)
        assert e.value.code == code, e.value.message
        assert "\n" not in e.value.message
        return e.value.message

    async def raw(self, *lines: bytes) -> list[dict]:
        """Send raw lines on a fresh connection; the replies until it closes."""
        def talk():
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(self.socket_path)
                s.sendall(b"".join(lines))
                s.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            return [json.loads(line) for line in data.splitlines()]
        return await asyncio.to_thread(talk)


@pytest.fixture
async def admin(tmp_path):
    a = Admin(tmp_path)
    server, _owned = await start_admin_server(a.socket_path, a.controller)
    yield a
    a.client.close()
    server.close()
    await server.wait_closed()
    a.manager.close()


async def test_socket_is_0660(admin):
    assert stat.S_IMODE(os.stat(admin.socket_path).st_mode) == 0o660


async def test_status(admin):
    await admin.call("volume.create", name="a", size="1M")
    admin.registry.add(NbdConnectionStandIn(), "a", "peer", "unix")
    status = await admin.call("status")
    assert status["version"] == "test" and status["pid"] == os.getpid()
    assert status["listeners"] == [{"uri": "unix:/nowhere"}]
    assert status["volumes"] == 1
    assert [c["export"] for c in status["connections"]] == ["a"]


async def test_volume_life_cycle(admin):
    created = await admin.call("volume.create", name="db", size="1G", region_size="1M")
    assert created == {"name": "db", "size": 1 << 30, "region_size": 1 << 20,
                       "read_only": False, "allocated": 0, "connections": 0,
                       "path": os.path.join(admin.manager.volumes_dir, "db.img")}
    await admin.call("volume.create", name="logs", size=4096, read_only=True)
    listed = await admin.call("volume.list")
    assert [v["name"] for v in listed["volumes"]] == ["db", "logs"]
    assert (await admin.call("volume.show", name="logs"))["read_only"] is True
    resized = await admin.call("volume.resize", name="db", size="2G")
    assert resized["size"] == 2 << 30
    assert await admin.call("volume.delete", name="db") == {
        "name": "db", "deleted": True, "connections_closed": 0}
    assert [v["name"] for v in (await admin.call("volume.list"))["volumes"]] == ["logs"]


async def test_errors_carry_codes(admin):
    await admin.call("volume.create", name="db", size="1M")
    assert "multiple of 4096" in await admin.fails("bad-input", "volume.create",
                                                   name="x", size=1000)
    assert "invalid volume name" in await admin.fails("bad-input", "volume.create",
                                                      name="../x", size="1M")
    assert "only grow" in await admin.fails("bad-input", "volume.resize", name="db", size=4096)
    await admin.fails("bad-input", "volume.create", name="x", size="1M", read_only="no")
    assert "already exists" in await admin.fails("conflict", "volume.create",
                                                 name="db", size="1M")
    await admin.fails("not-found", "volume.show", name="nope")
    await admin.fails("not-found", "volume.delete", name="nope")
    assert "volume.nope" in await admin.fails("unknown-method", "volume.nope")
    message = await admin.fails("bad-input", "volume.create", name="x", size="1M", sise=1)
    assert "'sise'" in message
    assert "size" in await admin.fails("bad-input", "volume.create", name="x")
    # Nothing was created by any of that.
    assert [v["name"] for v in (await admin.call("volume.list"))["volumes"]] == ["db"]


async def test_delete_refused_while_connected_unless_forced(admin):
    await admin.call("volume.create", name="db", size="1M")
    conn = NbdConnectionStandIn()
    admin.registry.add(conn, "db", "127.0.0.1:5555", "tcp")
    assert (await admin.call("volume.show", name="db"))["connections"] == 1
    message = await admin.fails("conflict", "volume.delete", name="db")
    assert "1 NBD connection" in message
    assert admin.manager.find("db") is not None and conn.closed_because is None
    result = await admin.call("volume.delete", name="db", force=True)
    assert result["connections_closed"] == 1
    assert conn.closed_because == "volume deleted"
    assert admin.manager.find("db") is None and admin.registry.count() == 0


async def test_internal_errors_are_logged_and_the_server_goes_on(admin, caplog):
    admin.info_fails = True
    with caplog.at_level(logging.ERROR, logger="daemon.admin_server"):
        message = await admin.fails("internal", "status")
    assert "boom" in message
    assert any(r.exc_info for r in caplog.records)
    admin.info_fails = False
    assert (await admin.call("status"))["version"] == "test"


async def test_bad_requests(admin):
    replies = await admin.raw(
        b"not json\n",
        b"[1, 2]\n",
        b'{"id": 7}\n',
        b'{"id": "x", "method": "status", "params": [1]}\n',
        b'{"id": "x", "method": 5}\n',
        b"\xff\xfe\n",
        b"[" * 100_000 + b"\n",
        b"\n",  # blank lines are skipped
        b'{"id": {"any": "json"}, "method": "volume.list"}\n',
        b'{"method": "volume.list"}',  # the last one may lack its newline
    )
    codes = [r.get("error", {}).get("code") for r in replies]
    assert codes == ["bad-request"] * 7 + [None, None]
    assert replies[2]["id"] == 7 and replies[3]["id"] == "x"
    assert replies[7] == {"id": {"any": "json"}, "result": {"volumes": []}}
    assert replies[8] == {"id": None, "result": {"volumes": []}}


async def test_many_requests_on_one_connection(admin):
    for i in range(50):
        await admin.call("volume.create", name=f"v{i}", size=4096)
    assert len((await admin.call("volume.list"))["volumes"]) == 50


async def test_overlong_line_closes_the_connection(admin):
    replies = await admin.raw(b'{"id": 1, "method": "status"}\n',
                              b"x" * (MAX_LINE + 10) + b"\n",
                              b'{"id": 2, "method": "status"}\n')
    assert replies[0]["id"] == 1 and "result" in replies[0]
    assert replies[1]["error"]["code"] == "bad-request"
    assert len(replies) == 2
    assert (await admin.call("status"))["volumes"] == 0  # the server is fine


async def test_a_line_of_exactly_the_cap_is_served(admin):
    request = b'{"id": 1, "method": "status", "pad": "'
    line = request + b"x" * (MAX_LINE - len(request) - 2) + b'"}'
    replies = await admin.raw(line + b"\n")
    assert replies[0]["id"] == 1 and "result" in replies[0]


async def test_stale_socket_is_replaced(tmp_path):
    path = str(tmp_path / "admin.sock")
    left_over = socket.socket(socket.AF_UNIX)
    left_over.bind(path)  # bound, never listening: what a killed daemon leaves
    left_over.close()
    with VolumeManager(str(tmp_path / "data")) as manager:
        controller = Controller(manager, ConnectionRegistry(), dict)
        server, _owned = await start_admin_server(path, controller)
        try:
            with pytest.raises(FileExistsError, match="another process is listening"):
                await start_admin_server(path, controller)
            status = await asyncio.to_thread(AdminClient(path).call, "status")
            assert status["volumes"] == 0
        finally:
            server.close()
            await server.wait_closed()


async def test_refuses_to_replace_a_file(tmp_path):
    path = tmp_path / "admin.sock"
    path.write_text("not a socket")
    with pytest.raises(FileExistsError, match="not a socket"):
        await start_admin_server(str(path), None)
    assert path.read_text() == "not a socket"


def test_unreachable_daemon(tmp_path):
    with pytest.raises(AdminError) as e:
        AdminClient(str(tmp_path / "nobody.sock")).call("status")
    assert e.value.code == "unreachable"
    assert e.value.message.startswith(f"cannot reach splitd at {tmp_path / 'nobody.sock'}: ")


def test_socket_path_defaults(monkeypatch):
    monkeypatch.delenv("SPLITD_ADMIN_SOCKET", raising=False)
    assert AdminClient().socket_path == "/run/splitd/admin.sock"
    monkeypatch.setenv("SPLITD_ADMIN_SOCKET", "/tmp/x.sock")
    assert AdminClient().socket_path == "/tmp/x.sock"
    assert AdminClient("/tmp/y.sock").socket_path == "/tmp/y.sock"
    with pytest.raises(ValueError, match="empty"):
        AdminClient("")    # not the default: an empty path is a mistake
