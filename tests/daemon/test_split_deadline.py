"""A split's deadline (`not_after`, in the daemon's own monotonic clock as
`clock` answers it), against the real daemon: a split request arriving past
it is refused and splits nothing (the host agent's guard against a request
the network delivers after the agent gave up and thawed); one in time splits;
a group split the same; a deadline that is not a number is bad input."""
from __future__ import annotations

import pytest

from splitctl.client import AdminError


def _pair(d, name: str, group: str | None = None) -> None:
    d.create_volume(f"{name}-p", "1M")
    params = {"group": group} if group else {}
    d.call("pair.create", primary=f"{name}-p", secondary=name, create_secondary=True, **params)


def test_clock_is_the_daemons_monotonic_time(make_daemon):
    d = make_daemon()
    first = d.call("clock")["monotonic"]
    second = d.call("clock")["monotonic"]
    assert isinstance(first, float) and 0 < first <= second


def test_a_split_past_its_deadline_is_refused_and_splits_nothing(make_daemon):
    d = make_daemon()
    _pair(d, "s")
    now = d.call("clock")["monotonic"]
    with pytest.raises(AdminError) as e:
        d.call("pair.split", name="s", not_after=now - 0.001)
    assert e.value.code == "refused"
    assert e.value.message.startswith("split of pair 's' refused: its deadline passed"), e.value.message
    pair = d.call("pair.show", name="s")
    assert pair["state"] != "split" and pair["split_at"] is None
    # In time, it splits.
    got = d.call("pair.split", name="s", not_after=d.call("clock")["monotonic"] + 30)
    assert got["state"] == "split"


def test_a_group_split_past_its_deadline_is_refused(make_daemon):
    d = make_daemon()
    _pair(d, "a", group="g")
    _pair(d, "b", group="g")
    with pytest.raises(AdminError) as e:
        d.call("group.split", name="g", not_after=d.call("clock")["monotonic"] - 1)
    assert e.value.code == "refused" and "group 'g'" in e.value.message
    assert all(d.call("pair.show", name=n)["state"] != "split" for n in ("a", "b"))
    got = d.call("group.split", name="g", not_after=d.call("clock")["monotonic"] + 30)
    assert {p["state"] for p in got["pairs"]} == {"split"}


@pytest.mark.parametrize("bad", ["soon", True, [1]])
def test_a_deadline_that_is_not_a_number_is_bad_input(make_daemon, bad):
    d = make_daemon()
    _pair(d, "s")
    with pytest.raises(AdminError) as e:
        d.call("pair.split", name="s", not_after=bad)
    assert e.value.code == "bad-input" and "not_after" in e.value.message
    assert d.call("pair.show", name="s")["state"] != "split"
