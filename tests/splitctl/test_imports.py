"""splitctl stays a thin client: importing every one of its modules pulls in
none of the daemon's packages, and no event loop."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

import splitctl

FORBIDDEN_PACKAGES = ("daemon", "controller", "volumes")
FORBIDDEN_MODULES = ("asyncio", "uvloop", "sqlite3")


def splitctl_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(splitctl.__path__, "splitctl."))


def imported_by(modules: list[str]) -> set[str]:
    """The modules a fresh interpreter has loaded after importing `modules`."""
    probe = ("import importlib, sys\n"
             f"for name in {modules!r}:\n"
             "    importlib.import_module(name)\n"
             "print('\\n'.join(sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_every_splitctl_module_is_walked():
    # The check below is only as good as this list: it must see the command modules.
    modules = splitctl_modules()
    assert {"splitctl.cli", "splitctl.client", "splitctl.args", "splitctl.output",
            "splitctl.commands.pair"} <= set(modules)


def test_splitctl_imports_no_daemon_package():
    loaded = imported_by(splitctl_modules())
    daemon_side = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN_PACKAGES)
    assert daemon_side == [], f"splitctl imports {daemon_side}"
    heavy = sorted(m for m in FORBIDDEN_MODULES if m in loaded)
    assert heavy == [], f"splitctl imports {heavy}"


def test_common_imports_no_daemon_package():
    loaded = imported_by(["common", "common.errors", "common.names", "common.states"])
    daemon_side = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN_PACKAGES
                         or m in FORBIDDEN_MODULES)
    assert daemon_side == [], f"common imports {daemon_side}"
