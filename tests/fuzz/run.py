"""Long fuzzing runs with atheris (libFuzzer), for the targets of tests/fuzz/targets.py.

    pip install atheris                  # optional; not needed by the test suite
    python -m tests.fuzz.run resp_parser -max_total_time=600
    python -m tests.fuzz.run all -max_total_time=300     # each target in turn

Flags after the target go to libFuzzer (-runs=N, -max_total_time=S, -timeout=S for a hang,
-rss_limit_mb=MB for memory). The corpus it grows is kept under .fuzz/TARGET/ (not in git);
it starts from tests/fuzz/corpus/TARGET/, the inputs that broke something once. An input that
crashes, hangs or exceeds the memory limit is written as crash-*/timeout-*/oom-* in the
current directory: copy it to tests/fuzz/corpus/TARGET/ with a name that says what it is,
fix the bug, and the regression test (test_fuzz.py::test_corpus_inputs_stay_fixed) keeps it
fixed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def main(argv: list[str]) -> int:
    try:
        import atheris
    except ImportError:
        print("atheris is not installed: pip install atheris (then run this again)", file=sys.stderr)
        return 2
    # Coverage feedback: the code under test is instrumented as it is imported.
    with atheris.instrument_imports(include=["services"]):
        import services.common.authz  # noqa: F401
        import services.common.config  # noqa: F401
        import services.common.identity  # noqa: F401
        import services.common.rbac  # noqa: F401
        import services.dbproxy.resp  # noqa: F401
        import services.dbproxy.sessioncore  # noqa: F401
    from tests.fuzz.targets import TARGETS

    if not argv or argv[0] not in [*TARGETS, "all"]:
        print(f"usage: python -m tests.fuzz.run TARGET|all [libFuzzer flags]; targets: {', '.join(TARGETS)}",
              file=sys.stderr)
        return 2
    name, flags = argv[0], argv[1:]
    if name == "all":
        rc = 0
        for t in TARGETS:
            print(f"== {t}", flush=True)
            rc |= subprocess.call([sys.executable, "-m", "tests.fuzz.run", t, *flags], cwd=REPO)
        return rc
    work = REPO / ".fuzz" / name
    work.mkdir(parents=True, exist_ok=True)
    seeds = HERE / "corpus" / name
    dirs = [str(work)] + ([str(seeds)] if seeds.is_dir() else [])
    defaults = ["-timeout=10", "-rss_limit_mb=2048", "-max_len=8192"]
    given = {f.split("=")[0] for f in flags}
    flags = [d for d in defaults if d.split("=")[0] not in given] + flags
    target = TARGETS[name]
    atheris.Setup([sys.argv[0], *flags, *dirs], target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
