"""Configuration values, from the TOML file and from flags: each checked as
strictly as the other, refused in one line naming where it came from, exit 2."""
from __future__ import annotations

import subprocess

import pytest

from tests.conftest import BIN, Daemon


def run_splitd(tmp_path, *args: str, config: str | None = None) -> subprocess.CompletedProcess:
    """splitd on sockets in tmp_path, with `config` as its file ("/dev/null" if None)."""
    cfg = "/dev/null"
    if config is not None:
        cfg = str(tmp_path / "splitd.toml")
        (tmp_path / "splitd.toml").write_text(config)
    return subprocess.run([str(BIN / "splitd"), "--config", cfg,
                           "--data-dir", str(tmp_path / "data"),
                           "--admin-socket", str(tmp_path / "a.sock"),
                           "--listen", f"unix:{tmp_path}/n.sock", *args],
                          capture_output=True, text=True, timeout=20, check=False)


def refused(cp: subprocess.CompletedProcess) -> str:
    """Exit 2, stderr one line without a traceback; returns that line."""
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in cp.stderr, cp.stderr
    assert lines[0].startswith("splitd: error: ")
    return lines[0]


@pytest.mark.parametrize("line, message", [
    ('tls = "requried"', "tls: must be one of off, on, require (got 'requried')"),
    ('tls = true', "tls: must be one of off, on, require (got true)"),
    ('max_connections = "lots"', "max_connections: must be a whole number (got 'lots')"),
    ('max_connections = 2.5', "max_connections: must be a whole number (got 2.5)"),
    ('max_inflight = true', "max_inflight: must be a whole number (got true)"),
    ('handshake_timeout = "x"', "handshake_timeout: must be a number of seconds (got 'x')"),
    ('shutdown_grace = nan', "shutdown_grace: must be a number of seconds (got nan)"),
    ('log_level = "loud"', "log_level: must be one of debug, info, warning, error (got 'loud')"),
    ('data_dir = 5', "data_dir: must be a string (got 5)"),
    ('data_dir = ""', "data_dir: must not be empty"),
    ('admin_socket = ["a"]', "admin_socket: must be a string (got ['a'])"),
    ('listen = [1, 2]', "listen: must be a string or a list of strings (got [1, 2])"),
    ('listen = []', "listen: must list at least one listen URI"),
    ('listen = ["udp://1.2.3.4:5"]', "listen: 'udp://1.2.3.4:5': a listen URI is"),
    ('tls_verify_peer = "yes"', "tls_verify_peer: must be true or false (got 'yes')"),
    ('tls_verify_peer = 1', "tls_verify_peer: must be true or false (got 1)"),
    ('tls_cert = 1', "tls_cert: must be a string (got 1)"),
    ('default_export = "a/b"', "default_export: invalid volume name 'a/b'"),
    ('copy_rate = "fast"', "copy_rate: invalid copy rate 'fast'"),
    ('copy_rate = -1', "copy_rate: copy rate must be 0 (unlimited) or more"),
    ('ensure_volume = [1]', "ensure_volume: must be a string or a list of strings (got [1])"),
    ('ensure_volume = "x:1Q"', "ensure_volume: 'x:1Q': invalid size of volume x '1Q'"),
    ('ensure_volume = ["x:1G", "x:2G"]', "ensure_volume: 'x:2G': volume x is listed twice"),
])
def test_bad_value_in_the_file_names_file_and_key(tmp_path, line, message):
    line_out = refused(run_splitd(tmp_path, config=line + "\n"))
    assert line_out.startswith(f"splitd: error: {tmp_path / 'splitd.toml'}: "), line_out
    assert message in line_out
    assert not (tmp_path / "data").exists()


def test_tls_from_the_file_without_a_certificate(tmp_path):
    line = refused(run_splitd(tmp_path, config='tls = "on"\n'))
    assert f"{tmp_path / 'splitd.toml'}: tls: 'on' needs tls_cert and tls_key" in line


@pytest.mark.parametrize("args, message", [
    (["--handshake-timeout", "-1"], "--handshake-timeout: must be greater than 0 (got -1)"),
    (["--handshake-timeout", "0"], "--handshake-timeout: must be greater than 0 (got 0)"),
    (["--handshake-timeout", "nan"], "--handshake-timeout: must be a number of seconds (got nan)"),
    (["--handshake-timeout", "inf"], "--handshake-timeout: must be at most 86400"),
    (["--shutdown-grace", "-3"], "--shutdown-grace: must be 0 or more (got -3)"),
    (["--max-connections", "0"], "--max-connections: must be at least 1 (got 0)"),
    (["--max-inflight", "-5"], "--max-inflight: must be at least 1 (got -5)"),
    (["--copy-rate", "-1"], "--copy-rate: invalid copy rate '-1'"),
    (["--default-export", "../x"], "--default-export: invalid volume name '../x'"),
    (["--ensure-volume", "v:12345"], "--ensure-volume: 'v:12345': size of volume v '12345' "
                                     "is not a multiple of 4096"),
])
def test_numbers_out_of_range_from_flags(tmp_path, args, message):
    line = refused(run_splitd(tmp_path, *args))
    assert message in line, line


@pytest.mark.parametrize("line, message", [
    ("handshake_timeout = -1", "handshake_timeout: must be greater than 0 (got -1)"),
    ("shutdown_grace = -3", "shutdown_grace: must be 0 or more (got -3)"),
    ("shutdown_grace = 1e9", "shutdown_grace: must be at most 86400"),
    ("max_inflight = 0", "max_inflight: must be at least 1 (got 0)"),
    ('reply_memory = "1M"', "reply_memory: must be at least 64M, two of the largest replies"),
    ('reply_memory = "lots"', "reply_memory: invalid reply memory 'lots'"),
])
def test_numbers_out_of_range_from_the_file(tmp_path, line, message):
    out = refused(run_splitd(tmp_path, config=line + "\n"))
    assert f"{tmp_path / 'splitd.toml'}: {message}" in out, out


def test_ensure_volume_specs_are_all_checked_before_any_is_made(tmp_path):
    cp = run_splitd(tmp_path, config='ensure_volume = ["good:4M", "bad/name:1G"]\n')
    assert "invalid volume name 'bad/name'" in refused(cp)
    assert not (tmp_path / "data").exists()
    cp = run_splitd(tmp_path, "--ensure-volume", "good:4M", "--ensure-volume", "bad/name:1G")
    assert "--ensure-volume: 'bad/name:1G'" in refused(cp)
    assert not (tmp_path / "data").exists()


def test_a_single_ensure_volume_string_is_one_volume(tmp_path):
    """`ensure_volume = "x:4M"` is the volume x, like a single `listen` string."""
    cfg = tmp_path / "splitd.toml"
    cfg.write_text('ensure_volume = "x:4M"\nmax_connections = 3\ntls_verify_peer = false\n'
                   'handshake_timeout = 5\nshutdown_grace = 0\n')
    d = Daemon(tmp_path, tcp=False)
    args = d.args()
    args[args.index("/dev/null")] = str(cfg)
    d.args = lambda: args
    d.start()
    try:
        vols = d.call("volume.list")["volumes"]
        assert [(v["name"], v["size"]) for v in vols] == [("x", 4 << 20)]
    finally:
        assert d.stop() == 0


def test_ensure_volume_never_resizes_and_says_so(make_daemon):
    d = make_daemon(["--ensure-volume", "x:4M"], tcp=False)
    d.call("volume.resize", name="x", size="8M")
    assert d.stop() == 0
    d.extra_args = ["--ensure-volume", "x:4M"]
    d.start()
    vols = d.call("volume.list")["volumes"]
    assert [(v["name"], v["size"]) for v in vols] == [("x", 8 << 20)]
    assert "ensure-volume x:4 MiB: volume x exists with 8 MiB; left as it is" in d.log()


# -- the Config object itself (no process) -------------------------------------------------

def test_config_is_frozen_and_normalised(tmp_path):
    import dataclasses

    from daemon.config import DEFAULTS, build_parser, load_config

    (tmp_path / "splitd.toml").write_text(
        f'listen = "unix:{tmp_path}/n.sock"\nensure_volume = "demo"\nshutdown_grace = 3\n'
        'copy_rate = "1M"\n')
    args = build_parser().parse_args([
        "--config", str(tmp_path / "splitd.toml"), "--data-dir", str(tmp_path / "data"),
        "--admin-socket", str(tmp_path / "a.sock"), "--shutdown-grace", "5"])
    cfg = load_config(args)
    # The file overrides the defaults, flags override the file.
    assert cfg.listen == (f"unix:{tmp_path}/n.sock",)
    assert cfg.shutdown_grace == 5.0 and isinstance(cfg.shutdown_grace, float)
    assert cfg.ensure_volume == (("demo", 1 << 30),)
    assert cfg.copy_rate == 1 << 20
    assert cfg.max_connections == DEFAULTS.max_connections
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tls = "on"  # type: ignore[misc]
