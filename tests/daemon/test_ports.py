"""Ports (named listeners) and `locate` against the real daemon: names from
flags and from the file, start-up refusals, `splitctl port list`, and
`splitctl locate`, whose URI is then opened with libnbd to read the split
secondary through that very port."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from splitctl.client import AdminError
from tests.conftest import BIN, Daemon, free_tcp_port
from tests.daemon.test_tls import pki  # noqa: F401  (the throw-away CA fixture)
from tests.splitctl.test_cli import one_line_error

nbd = pytest.importorskip("nbd")

MiB = 1 << 20
PATTERN = b"split me"


def split_pair(d: Daemon, primary: str = "db", secondary: str = "snap") -> bytes:
    """A pair whose secondary holds a known image, split; that image."""
    d.create_volume(primary, "8M")
    data = PATTERN * (MiB // len(PATTERN))
    h = nbd.NBD()
    h.connect_uri(d.uri(primary))
    h.pwrite(data, 0)
    h.flush()
    h.shutdown()
    d.call("pair.create", primary=primary, secondary=secondary, create_secondary=True)
    with d.admin() as a:
        a.wait_pair(secondary, "synced", timeout=50, interval=0.1)
    d.call("pair.split", name=secondary)
    # Written after the split: the secondary must not see it.
    h = nbd.NBD()
    h.connect_uri(d.uri(primary))
    h.pwrite(b"after" * 100, 0)
    h.shutdown()
    return data


def read_through(uri: str, length: int, tls_dir: str | None = None) -> bytes:
    h = nbd.NBD()
    if tls_dir is not None:
        h.set_tls_certificates(tls_dir)
    h.connect_uri(uri)
    try:
        return h.pread(length, 0)
    finally:
        h.shutdown()


def locate(d: Daemon, *args: str) -> dict:
    return json.loads(d.splitctl("locate", *args, "--json").stdout)


def refused(d: Daemon, *args: str) -> str:
    cp = d.splitctl(*args, check=False)
    assert cp.returncode == 1, cp
    return one_line_error(cp, "splitctl: ")


# -- naming -----------------------------------------------------------------------------

def test_names_from_flags_and_defaults(make_daemon):
    port = free_tcp_port()
    d = make_daemon(["--listen", f"backup=tcp://127.0.0.1:{port}"])
    ports = d.call("port.list")["ports"]
    assert [(p["name"], p["uri"]) for p in ports] == [
        ("unix", f"unix:{d.nbd_socket}"), ("tcp", f"tcp://127.0.0.1:{d.tcp_port}"),
        ("backup", f"tcp://127.0.0.1:{port}")]
    assert [p["bound"] for p in ports] == [[str(d.nbd_socket)], [f"127.0.0.1:{d.tcp_port}"],
                                           [f"127.0.0.1:{port}"]]
    assert {p["tls"] for p in ports} == {"off"}
    # status lists the same listeners, by the same names.
    assert [x["name"] for x in d.call("status")["listeners"]] == ["unix", "tcp", "backup"]


def start_with_file(base, listen: str) -> Daemon:
    """splitd with only --config: data directory, admin socket and `listen`
    (TOML lines, last in the file) from the file."""
    d = Daemon(base, tcp=False)
    base.mkdir()
    cfg = base / "splitd.toml"
    cfg.write_text(f'data_dir = "{d.data_dir}"\nadmin_socket = "{d.admin_socket}"\n{listen}')
    args = [str(BIN / "splitd"), "--config", str(cfg)]
    d.args = lambda: args  # type: ignore[method-assign]
    return d.start()


def test_names_from_the_file_as_a_table_and_as_a_list(tmp_path):
    port = free_tcp_port()
    d = start_with_file(tmp_path / "table", f'[listen]\nlocal = "unix:{tmp_path}/table/nbd.sock"\n'
                                            f'backup = "tcp://127.0.0.1:{port}"\n')
    try:
        assert [p["name"] for p in d.call("port.list")["ports"]] == ["local", "backup"]
    finally:
        assert d.stop() == 0
    d = start_with_file(tmp_path / "list", f'listen = ["local=unix:{tmp_path}/list/nbd.sock", '
                                           f'"tcp://127.0.0.1:{port}"]\n')
    try:
        assert [p["name"] for p in d.call("port.list")["ports"]] == ["local", "tcp"]
    finally:
        assert d.stop() == 0


def run_splitd(tmp_path, *args: str, config: str | None = None) -> subprocess.CompletedProcess:
    cfg = "/dev/null"
    if config is not None:
        cfg = str(tmp_path / "splitd.toml")
        (tmp_path / "splitd.toml").write_text(config)
    return subprocess.run([str(BIN / "splitd"), "--config", cfg, "--data-dir", str(tmp_path / "d"),
                           "--admin-socket", str(tmp_path / "a.sock"), *args],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("listen, message", [
    (["a=unix:{t}/a.sock", "a=unix:{t}/b.sock"], "--listen: port name 'a' is given twice"),
    (["tcp=unix:{t}/a.sock", "tcp://127.0.0.1:1"],
     "--listen: port name 'tcp' is given twice: 'tcp://127.0.0.1:1' has it by default"),
    (["bad name=unix:{t}/a.sock"], "--listen: invalid port name 'bad name'"),
    (["../x=unix:{t}/a.sock"], "--listen: invalid port name '../x'"),
])
def test_bad_or_duplicate_names_are_refused_at_start(tmp_path, listen, message):
    args = [a for spec in listen for a in ("--listen", spec.format(t=tmp_path))]
    cp = run_splitd(tmp_path, *args)
    assert cp.returncode == 2, cp.stderr
    assert cp.stderr.count("\n") == 1 and message in cp.stderr, cp.stderr
    assert not (tmp_path / "a.sock").exists() and not (tmp_path / "d").exists()


def test_duplicate_names_in_the_file_name_the_file(tmp_path):
    cp = run_splitd(tmp_path, config=f'listen = ["x=unix:{tmp_path}/a.sock", '
                                     f'"x=unix:{tmp_path}/b.sock"]\n')
    assert cp.returncode == 2
    assert f"{tmp_path}/splitd.toml: listen: port name 'x' is given twice" in cp.stderr


# -- splitctl port list -----------------------------------------------------------------

def test_port_list_table_and_json(make_daemon):
    port = free_tcp_port()
    d = make_daemon(["--listen", f"lo=tcp://%lo:{port}"])
    cp = d.splitctl("port", "list")
    lines = cp.stdout.splitlines()
    assert lines[0].split() == ["PORT", "URI", "TLS", "BOUND", "TO"]
    assert lines[1].split() == ["unix", f"unix:{d.nbd_socket}", "off", str(d.nbd_socket)]
    assert lines[2].split() == ["tcp", f"tcp://127.0.0.1:{d.tcp_port}", "off",
                                f"127.0.0.1:{d.tcp_port}"]
    assert lines[3].split() == ["lo", f"tcp://%lo:{port}", "off", f"127.0.0.1:{port}"]
    ports = json.loads(d.splitctl("port", "list", "--json").stdout)["ports"]
    lo = ports[2]
    # An interface port shows each address, one line each after its first.
    assert [line.split() for line in lines[4:]] == [[b] for b in lo["bound"][1:]]
    assert lo == {"name": "lo", "uri": f"tcp://%lo:{port}", "kind": "tcp", "tls": "off",
                  "bound": lo["bound"]}
    assert lo["bound"][0] == f"127.0.0.1:{port}"


def test_port_list_shows_tls_modes(make_daemon, pki):  # noqa: F811
    d = make_daemon(["--tls", "require", *pki["server_args"]])
    modes = {p["name"]: p["tls"] for p in d.call("port.list")["ports"]}
    # A Unix socket stays plaintext under --tls require (STARTTLS offered).
    assert modes == {"unix": "on", "tcp": "require"}
    lines = d.splitctl("port", "list").stdout.splitlines()
    assert [line.split()[2] for line in lines[1:]] == ["on", "require"]


# -- splitctl locate --------------------------------------------------------------------

def test_locate_through_unix_and_tcp_reads_the_split_image(make_daemon):
    d = make_daemon()
    image = split_pair(d)
    for name in ("snap", "db"):     # the pair, or its primary (in one pair only)
        unix = locate(d, name, "--port", "unix")
        assert unix["uri"] == f"nbd+unix:///snap?socket={d.nbd_socket}"
        assert unix["uris"] == [unix["uri"]]
        assert (unix["pair"], unix["primary"], unix["secondary"]) == ("snap", "db", "snap")
        assert (unix["state"], unix["port"], unix["tls"]) == ("split", "unix", "off")
        assert unix["generation"] == d.call("pair.show", name="snap")["generation"]
        assert unix["split_at"] == d.call("pair.show", name="snap")["split_at"]
    tcp = locate(d, "snap", "--port", "tcp")
    assert tcp["uri"] == f"nbd://127.0.0.1:{d.tcp_port}/snap"
    for uri in (unix["uri"], tcp["uri"]):
        assert read_through(uri, len(image)) == image
    # For people: the URI alone first, then the facts.
    cp = d.splitctl("locate", "snap", "--port", "tcp")
    lines = cp.stdout.splitlines()
    assert lines[0] == tcp["uri"]
    assert lines[1].split() == ["pair:", "snap", "(db", "->", "snap)"]
    assert "state:" in lines[2] and "split" in lines[2]
    assert "port:" in cp.stdout and "tcp (TLS off)" in cp.stdout


def test_locate_through_an_interface_port(make_daemon):
    port = free_tcp_port()
    d = make_daemon(["--listen", f"lo=tcp://%lo:{port}"])
    image = split_pair(d)
    found = locate(d, "snap", "--port", "lo")
    assert found["uri"] == f"nbd://127.0.0.1:{port}/snap"
    bound = d.call("port.list")["ports"][2]["bound"]
    assert len(found["uris"]) == len(bound)
    if f"[::1]:{port}" in bound:
        assert f"nbd://[::1]:{port}/snap" in found["uris"]
    for uri in found["uris"]:
        assert read_through(uri, len(image)) == image


def test_locate_through_a_tls_port_is_nbds(make_daemon, pki):  # noqa: F811
    d = make_daemon(["--tls", "require", *pki["server_args"]])
    image = split_pair(d)
    found = locate(d, "snap", "--port", "tcp")
    assert found["uri"] == f"nbds://127.0.0.1:{d.tcp_port}/snap"
    assert found["tls"] == "require"
    assert read_through(found["uri"], len(image), tls_dir=str(pki["anonymous"])) == image
    # Plaintext through that port is refused, as the nbds:// says.
    with pytest.raises(nbd.Error):
        read_through(found["uri"].replace("nbds://", "nbd://"), 512)


def test_a_port_has_its_own_tls_mode(make_daemon, pki):  # noqa: F811
    """?tls=MODE on a TCP listen URI: plaintext on one network, TLS required
    on another, whatever --tls says for the rest."""
    plain, secure = free_tcp_port(), free_tcp_port()
    d = make_daemon([*pki["server_args"], "--listen", f"plain=tcp://127.0.0.1:{plain}",
                     "--listen", f"secure=tcp://127.0.0.1:{secure}?tls=require"])
    image = split_pair(d)
    modes = {p["name"]: p["tls"] for p in d.call("port.list")["ports"]}
    assert modes == {"unix": "off", "tcp": "off", "plain": "off", "secure": "require"}
    found = locate(d, "snap", "--port", "secure")
    assert found["uri"] == f"nbds://127.0.0.1:{secure}/snap" and found["tls"] == "require"
    assert read_through(found["uri"], len(image), tls_dir=str(pki["anonymous"])) == image
    with pytest.raises(nbd.Error, match="not supported"):      # NBD_REP_ERR_TLS_REQD
        read_through(found["uri"].replace("nbds://", "nbd://"), 512)
    found = locate(d, "snap", "--port", "plain")
    assert found["uri"] == f"nbd://127.0.0.1:{plain}/snap"
    assert read_through(found["uri"], len(image)) == image
    # No STARTTLS offered where the port's mode is off.
    with pytest.raises(nbd.Error):
        read_through(f"nbds://127.0.0.1:{plain}/snap", 512, tls_dir=str(pki["anonymous"]))

    # The other way round: TLS required everywhere but on one port.
    d = make_daemon(["--tls", "require", *pki["server_args"],
                     "--listen", f"app=tcp://127.0.0.1:{free_tcp_port()}?tls=off"])
    image = split_pair(d)
    modes = {p["name"]: p["tls"] for p in d.call("port.list")["ports"]}
    assert modes == {"unix": "on", "tcp": "require", "app": "off"}
    assert read_through(locate(d, "snap", "--port", "app")["uri"], len(image)) == image


@pytest.mark.parametrize("listen, message", [
    ("tcp://127.0.0.1:1?tls=maybe", "a TCP listen URI takes only ?tls=off, ?tls=on or ?tls=require"),
    ("tcp://127.0.0.1:1?foo=1", "a TCP listen URI takes only ?tls=off"),
    ("b=tcp://127.0.0.1:1?tls=require", "--listen: b=tcp://127.0.0.1:1?tls=require: TLS needs "
                                        "tls_cert and tls_key"),
])
def test_bad_port_tls_modes_are_refused_at_start(tmp_path, listen, message):
    cp = run_splitd(tmp_path, "--listen", listen)
    assert cp.returncode == 2, cp.stderr
    assert cp.stderr.count("\n") == 1 and message in cp.stderr, cp.stderr


def test_locate_a_pair_that_is_not_split_says_so(make_daemon):
    d = make_daemon()
    d.create_volume("db", "8M")
    d.call("pair.create", primary="db", secondary="snap", create_secondary=True)
    with d.admin() as a:
        a.wait_pair("snap", "synced", timeout=50, interval=0.1)
    found = locate(d, "snap", "--port", "unix")
    assert found["state"] == "pair"
    cp = d.splitctl("locate", "snap", "--port", "unix")
    assert "served only once the pair is split" in cp.stdout


def test_locate_refusals(make_daemon):
    anywhere = free_tcp_port()
    d = make_daemon(["--listen", f"any=tcp://0.0.0.0:{anywhere}"])
    for v in ("db", "lonely"):
        d.create_volume(v, "8M")
    for s in ("snap-a", "snap-b"):
        d.call("pair.create", primary="db", secondary=s, create_secondary=True)

    line = refused(d, "locate", "snap-a", "--port", "backup")
    assert line.startswith("splitctl: no port named 'backup' (the ports are: 'unix', 'tcp', "
                           "'any'"), line
    line = refused(d, "locate", "lonely", "--port", "unix")
    assert line.startswith("splitctl: volume 'lonely' is in no pair"), line
    line = refused(d, "locate", "db", "--port", "unix")
    assert line.startswith("splitctl: volume 'db' is the primary of 2 pairs ('snap-a', "
                           "'snap-b'): name the pair"), line
    line = refused(d, "locate", "nope", "--port", "unix")
    assert line.startswith("splitctl: no volume or pair named 'nope'"), line
    line = refused(d, "locate", "snap-a", "--port", "any")
    assert line.startswith("splitctl: port 'any' listens on every address of the host"), line
    # Naming the pair is the way out of the ambiguity.
    assert locate(d, "snap-b", "--port", "unix")["secondary"] == "snap-b"

    # The codes, for scripts.
    cp = d.splitctl("locate", "nope", "--port", "unix", "--json", check=False)
    assert cp.returncode == 1 and json.loads(cp.stdout)["error"]["code"] == "not-found"
    cp = d.splitctl("locate", "db", "--port", "unix", "--json", check=False)
    assert json.loads(cp.stdout)["error"]["code"] == "bad-input"
    # Straight to the API: untrusted parameters are refused, not crashed on.
    for params, words in (({"name": "snap-a", "port": 5}, "port must be a port name"),
                          ({"name": ["x"], "port": "unix"}, "volume name must be a string"),
                          ({"name": "snap-a"}, "missing parameter for locate: port")):
        with pytest.raises(AdminError, match=words):
            d.call("locate", **params)


@pytest.mark.parametrize("args, reason", [
    (["locate", "snap"], "required: --port"),
    (["locate", "snap", "--port", "bad name"], "invalid port name 'bad name'"),
    (["locate", "a/b", "--port", "unix"], "invalid volume name"),
    (["port", "frobnicate"], "invalid choice"),
])
def test_bad_command_lines_exit_2(tmp_path, args, reason):
    env = dict(os.environ, SPLITD_ADMIN_SOCKET=str(tmp_path / "none"))
    cp = subprocess.run([str(BIN / "splitctl"), *args], capture_output=True, text=True,
                        env=env, timeout=60)
    assert cp.returncode == 2
    assert reason in one_line_error(cp, "splitctl: error: ")


def test_not_reachable_is_exit_4(tmp_path):
    env = dict(os.environ, SPLITD_ADMIN_SOCKET=str(tmp_path / "none"))
    for args in (["port", "list"], ["locate", "snap", "--port", "unix"]):
        cp = subprocess.run([str(BIN / "splitctl"), *args], capture_output=True, text=True,
                            env=env, timeout=60)
        assert cp.returncode == 4, cp


@pytest.mark.parametrize("command, words", [
    (["port"], ["list", "ports:", "unix-2", "examples:"]),
    (["port", "list"], ["bound to", "TLS modes:", "require", "--json", "exit status:"]),
    (["locate"], ["NAME", "--port", "nbd+unix:///EXPORT?socket=PATH", "nbds://",
                  "primary of several pairs", "link-local", "examples:", "exit status:"]),
])
def test_help(tmp_path, command, words):
    cp = subprocess.run([str(BIN / "splitctl"), *command, "--help"], capture_output=True,
                        text=True, timeout=60)
    assert cp.returncode == 0 and cp.stdout.startswith("usage: splitctl")
    for w in words:
        assert w in cp.stdout, w


def test_splitd_help_documents_port_names():
    cp = subprocess.run([str(BIN / "splitd"), "--help"], capture_output=True, text=True,
                        timeout=60)
    assert "NAME=URI" in cp.stdout and "unix, unix-2" in cp.stdout and "[listen]" in cp.stdout


def test_a_connection_is_listed_under_its_port(make_daemon):
    d = make_daemon()
    d.create_volume("db", "8M")
    h = nbd.NBD()
    h.connect_uri(d.uri("db", tcp=True))
    try:
        assert [c["listener"] for c in d.call("status")["connections"]] == ["tcp"]
    finally:
        h.shutdown()
