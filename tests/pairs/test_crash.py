"""kill -9 during the initial copy, a split with regions pending, a resync, a
restore and an instant restore from a backup, under write load: after the restart every pair holds DESIGN.md's
guarantee or is in `error` with a reason (DESIGN.md "Crash safety").

A few rounds of scripts/crash.py (which says what each round checks); `make
crash` runs many more. SPLITD_CRASH_SEED picks other rounds than the default.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytest.importorskip("nbd")

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("SPLITD_CRASH_SEED", "20261124"))


def _load_crash():
    spec = importlib.util.spec_from_file_location("splitd_crash", ROOT / "scripts" / "crash.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


crash = _load_crash()

# (phase, kill while the request is under way, read policy): each phase once,
# each read policy at least once; `make crash` runs the rest of the mix.
CASES = [("copy", False, "wait"), ("split", False, "staging"),
         ("resync", True, "copy-on-read"), ("restore", False, "copy-on-read"),
         ("instant", False, "copy-on-read")]


@pytest.mark.parametrize("phase,at_call,policy", CASES,
                         ids=[f"{p}{'-at-call' if c else ''}-{pol}" for p, c, pol in CASES])
def test_kill9_round(tmp_path, phase, at_call, policy):
    n = CASES.index((phase, at_call, policy)) + 1
    r = crash.Round(n, SEED + n, phase, tmp_path, at_call=at_call, policy=policy)
    ok = r.run()
    report = "\n".join(r.notes + [r.outcome, f"(seed {r.seed}, policy {r.policy})"])
    if not ok:
        pytest.fail(f"{report}\n(data and log in {r.dir})\n"
                    f"--- splitd log (tail)\n" + "\n".join(r.d.log().splitlines()[-30:]),
                    pytrace=False)
    assert r.outcome.startswith(("ok", "error: ")), report
