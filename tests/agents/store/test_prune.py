"""Retention rules (gc.plan_prune), restic-like: buckets that have snapshots
count, the newest snapshot of a bucket is kept, groups are pruned apart."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from agents.store import RetentionPolicy, StoreBadInput
from agents.store.gc import plan_prune


def snaps(times: list[str], volume: str = "v") -> list[dict]:
    out = []
    for i, t in enumerate(times):
        when = datetime.fromisoformat(t)
        out.append({"id": f"{volume}-{i:02d}", "volume": volume, "source": "d", "pair": "p",
                    "created_at": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")})
    return out


def kept(plan) -> list[str]:
    return [m["id"] for m in plan.keep]


def test_keep_last():
    plan = plan_prune(snaps(["2026-01-01T00:00", "2026-01-01T01:00", "2026-01-01T02:00"]),
                      RetentionPolicy(last=2))
    assert kept(plan) == ["v-01", "v-02"] and [m["id"] for m in plan.remove] == ["v-00"]


def test_daily_keeps_the_newest_of_each_day_with_snapshots():
    times = ["2026-03-01T08:00", "2026-03-01T20:00",     # day 1: keep 20:00
             "2026-03-02T09:00",                         # day 2
             # no snapshot on 3 March: that day does not count
             "2026-03-04T07:00", "2026-03-04T23:59"]     # day 4: keep 23:59
    plan = plan_prune(snaps(times), RetentionPolicy(daily=3))
    assert kept(plan) == ["v-01", "v-02", "v-04"]
    assert plan.keep[0]["kept_by"] == ["daily"]


def test_weekly_uses_iso_weeks_and_monthly_months():
    start = datetime(2026, 1, 1)
    times = [(start + timedelta(days=d)).isoformat() for d in range(0, 70, 3)]
    plan = plan_prune(snaps(times), RetentionPolicy(weekly=2, monthly=3))
    ids = {m["id"]: m for m in snaps(times)}
    kept_ids = kept(plan)
    # monthly 3: the last snapshot of January, February and March (the newest).
    by_month: dict[str, str] = {}
    for sid, m in sorted(ids.items()):
        by_month[m["created_at"][:7]] = sid
    assert set(by_month.values()) <= set(kept_ids)
    assert len(kept_ids) <= 5


def test_fewer_buckets_than_asked_keeps_the_oldest_too():
    plan = plan_prune(snaps(["2026-05-01T00:00", "2026-05-01T05:00", "2026-05-02T00:00"]),
                      RetentionPolicy(daily=7))
    assert kept(plan) == ["v-00", "v-01", "v-02"]
    assert plan.keep[0]["kept_by"] == ["daily (oldest)"]


def test_groups_are_pruned_apart():
    plan = plan_prune(snaps(["2026-01-01T00:00", "2026-01-02T00:00"], "a")
                      + snaps(["2026-01-01T00:00"], "b"), RetentionPolicy(last=1))
    assert kept(plan) == ["a-01", "b-00"]


def test_no_rule_is_refused():
    with pytest.raises(StoreBadInput, match="no retention rule"):
        plan_prune(snaps(["2026-01-01T00:00"]), RetentionPolicy())
