"""The three-host site (harness/site.py) for the netns tests: namespaces
storage, app and backup joined by veth, the daemon in storage. Made once per
module (about 2 s), torn down whatever the tests did; without root the tests
skip."""
from __future__ import annotations

import pytest

from harness.site import Site, unavailable
from tests.conftest import need


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    need("openssl", "nbdinfo", "nbdcopy")
    s = Site(tmp_path_factory.mktemp("site")).start()
    yield s
    left = s.close()
    assert not left, f"the site left behind: {left}"
