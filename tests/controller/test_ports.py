"""Ports without a daemon: how listeners are named (daemon/listeners.py) and
how an export's URI is spelled through one (controller/ports.py)."""
from __future__ import annotations

import pytest

from common.errors import Conflict, NotFound
from controller.ports import export_uris, find_port, port_list
from daemon.listeners import ListenSpecError, parse_listeners


def names(*specs: str) -> list[str]:
    return [lst.name for lst in parse_listeners(specs)]


def test_unnamed_listeners_are_named_by_kind_counting_only_the_unnamed():
    assert names("unix:/a", "tcp://1.2.3.4:1", "tcp://1.2.3.4:2", "b=unix:/b", "unix:/c",
                 "backup=tcp://%eth1:10809") == ["unix", "tcp", "tcp-2", "b", "unix-2", "backup"]
    # Adding a named listener renames no other.
    assert names("x=unix:/x", "unix:/a", "tcp://[::1]:1") == ["x", "unix", "tcp"]


def test_a_unix_path_with_an_equals_sign_is_not_a_name():
    [lst] = parse_listeners(["unix:/run/a=b.sock"])
    assert (lst.name, lst.path) == ("unix", "/run/a=b.sock")


@pytest.mark.parametrize("specs, message", [
    (["a=unix:/a", "a=tcp://1.2.3.4:1"],
     "port name 'a' is given twice ('a=unix:/a' and 'a=tcp://1.2.3.4:1')"),
    (["tcp=unix:/a", "tcp://1.2.3.4:1"],
     "port name 'tcp' is given twice: 'tcp://1.2.3.4:1' has it by default"),
    (["unix:/a", "unix=unix:/b"], "port name 'unix' is given twice: 'unix:/a' has it by default"),
    (["bad name=unix:/a"], "invalid port name 'bad name' in 'bad name=unix:/a'"),
    (["=unix:/a"], "invalid port name '' in '=unix:/a'"),
    (["-x=tcp://1.2.3.4:1"], "invalid port name '-x'"),
])
def test_bad_or_duplicate_names_are_refused(specs, message):
    with pytest.raises(ListenSpecError) as e:
        parse_listeners(specs)
    assert message in str(e.value)


def port(name: str, uri: str, kind: str, bound: list[str], tls: str = "off") -> dict:
    return {"name": name, "uri": uri, "kind": kind, "bound": bound, "tls": tls,
            "tls_required": tls == "require"}


def test_uris_of_each_kind_of_port():
    unix = port("local", "unix:/run/my dir/nbd.sock", "unix", ["/run/my dir/nbd.sock"])
    assert export_uris(unix, "snap") == ["nbd+unix:///snap?socket=/run/my%20dir/nbd.sock"]
    tcp = port("tcp", "tcp://127.0.0.1:10809", "tcp", ["127.0.0.1:10809"])
    assert export_uris(tcp, "snap") == ["nbd://127.0.0.1:10809/snap"]
    tls = port("tcp", "tcp://[::1]:10809", "tcp", ["[::1]:10809"], tls="require")
    assert export_uris(tls, "snap") == ["nbds://[::1]:10809/snap"]
    # STARTTLS offered but not required: plaintext reaches it, so nbd://.
    assert export_uris(dict(tls, tls="on"), "snap") == ["nbd://[::1]:10809/snap"]


def test_an_interface_port_gives_every_address_link_local_last():
    iface = port("backup", "tcp://%eth1:10809", "tcp",
                 ["[fe80::1%eth1]:10809", "10.0.0.1:10809", "[2001:db8::1]:10809"])
    assert export_uris(iface, "snap") == ["nbd://10.0.0.1:10809/snap",
                                          "nbd://[2001:db8::1]:10809/snap",
                                          "nbd://[fe80::1%25eth1]:10809/snap"]


def test_a_wildcard_port_is_refused():
    anywhere = port("any", "tcp://0.0.0.0:10809", "tcp", ["0.0.0.0:10809"])
    with pytest.raises(Conflict, match="port 'any' listens on every address of the host"):
        export_uris(anywhere, "snap")


def test_an_unknown_port_names_the_known_ones():
    ports = [port("unix", "unix:/a", "unix", ["/a"]), port("tcp", "tcp://1.2.3.4:1", "tcp", [])]
    assert find_port(ports, "tcp")["name"] == "tcp"
    with pytest.raises(NotFound) as e:
        find_port(ports, "backup")
    assert str(e.value).startswith("no port named 'backup' (the ports are: 'unix', 'tcp'")
    assert [p["name"] for p in port_list(ports)] == ["unix", "tcp"]
