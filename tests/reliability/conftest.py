import pytest

from tests.reliability.stack import Stack


@pytest.fixture(scope="session")
def st(tmp_path_factory):
    """One cluster for every reliability test that needs one (each leaves it working)."""
    s = Stack(tmp_path_factory.mktemp("reliability"), users=("alice", "bob", "carol"), discovery=True)
    try:
        yield s.start()
    finally:
        s.stop()
