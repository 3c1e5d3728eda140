"""services.dbproxy.allocator: when `cachegate start` runs itself again on jemalloc, with what."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.common.config import apply_env
from services.dbproxy import allocator
from services.dbproxy.allocator import MARK, AllocatorError, find_jemalloc, reexec_env

LIB = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def test_auto_preloads_jemalloc_with_its_settings_and_keeps_the_rest_of_the_environment():
    env = reexec_env("auto", {"PATH": "/bin", "LD_PRELOAD": "/opt/other.so"}, loaded=False, library=LIB)
    assert env is not None
    assert env["LD_PRELOAD"] == f"{LIB} /opt/other.so" and env["PATH"] == "/bin"
    assert env["MALLOC_CONF"] == allocator.JEMALLOC_CONF and env[MARK] == "jemalloc"


def test_a_malloc_conf_of_the_operator_is_kept():
    env = reexec_env("jemalloc", {"MALLOC_CONF": "narenas:2"}, loaded=False, library=LIB)
    assert env is not None and env["MALLOC_CONF"] == "narenas:2"


@pytest.mark.parametrize("setting, environ, loaded", [
    ("system", {}, False),              # glibc's malloc asked for
    ("auto", {MARK: "jemalloc"}, False),  # already run again once: never a loop
    ("auto", {}, True),                 # jemalloc already in (LD_PRELOAD by the operator)
])
def test_no_second_run(setting, environ, loaded):
    assert reexec_env(setting, environ, loaded=loaded, library=LIB) is None


def test_auto_without_the_library_goes_on_with_glibc_and_jemalloc_refuses_to_start():
    assert reexec_env("auto", {}, loaded=False, library="") is None
    with pytest.raises(AllocatorError, match="install libjemalloc2"):
        reexec_env("jemalloc", {}, loaded=False, library="")


def test_the_mark_is_not_read_as_a_config_key():
    assert apply_env({}, {MARK: "jemalloc"}) == {}


@pytest.mark.skipif(find_jemalloc() is None, reason="libjemalloc2 is not installed (redis-server brings it)")
def test_a_process_started_with_the_environment_allocates_with_jemalloc_and_can_purge():
    env = reexec_env("auto", {"PATH": "/usr/bin:/bin"}, loaded=False)
    code = ("from services.dbproxy.allocator import jemalloc_loaded, purge; "
            "from services.dbproxy.limits import tune_malloc; "
            "print(jemalloc_loaded(), purge(), tune_malloc())")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": ":".join(sys.path)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "False"]  # and glibc's mallopt is not touched
    plain = subprocess.run([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)},
                           capture_output=True, text=True, check=True).stdout.split()
    assert plain == ["False", "False", "True"]
