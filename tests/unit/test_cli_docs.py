"""docs/cli.md stays true to the CLIs: its generated reference equals what
`python -m services.cli.gendocs` makes from --help now, and its tables at a glance name only
commands that exist, and every one that does."""

from __future__ import annotations

import re

from services.cli import gendocs


def test_docs_cli_md_reference_matches_the_clis_help():
    doc = gendocs.DOC.read_text()
    assert gendocs.render(doc) == doc, "docs/cli.md is stale: run `python -m services.cli.gendocs`"


def test_gendocs_check_fails_on_a_stale_reference_and_a_run_fixes_it(tmp_path, capsys):
    stale = tmp_path / "cli.md"
    stale.write_text(gendocs.DOC.read_text().replace("Bind every port to a free one", "Bind a port", 1))
    assert gendocs.main(["--check", "--doc", str(stale)]) == 1
    assert "is out of date with the CLIs' --help: run `python -m services.cli.gendocs`" in capsys.readouterr().err
    assert gendocs.main(["--doc", str(stale)]) == 0
    assert gendocs.main(["--check", "--doc", str(stale)]) == 0
    assert stale.read_text() == gendocs.DOC.read_text()


def _glance_rows() -> list[str]:
    """The first cell of each row of the hand-written tables (before the generated part)."""
    head = gendocs.DOC.read_text().split(gendocs.BEGIN, 1)[0]
    rows = []
    for line in head.splitlines():
        m = re.match(r"\| `((?:cachegate|cgctl|cgate) [^`]*)`", line)
        if m:
            rows.append(m.group(1))
    return rows


def test_tables_at_a_glance_name_every_command_and_no_other():
    paths = set(gendocs.command_paths())
    assert {"cgctl tokens add", "cgate db connect", "cachegate dev"} <= paths
    seen, unknown = set(), []
    for row in _glance_rows():
        words = row.split()
        # the longest run of leading words that is a command
        match = next((" ".join(words[:n]) for n in range(len(words), 0, -1) if " ".join(words[:n]) in paths), None)
        if match is None:
            unknown.append(row)
        else:
            seen.add(match)
    assert not unknown, f"docs/cli.md names commands the CLIs do not have: {unknown}"
    assert not paths - seen, f"commands missing from the tables of docs/cli.md: {sorted(paths - seen)}"
