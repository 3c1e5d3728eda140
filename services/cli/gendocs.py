"""The command reference of docs/cli.md, generated from the three CLIs themselves (their
usage, help and options, as ``--help`` shows them), so the reference cannot drift.

    python -m services.cli.gendocs           # rewrite the generated part of docs/cli.md
    python -m services.cli.gendocs --check   # exit 1, saying so, when docs/cli.md is stale

Only the part between the BEGIN/END markers is generated; the prose around it is kept.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import typer

BEGIN = "<!-- BEGIN GENERATED: `python -m services.cli.gendocs` writes this part from --help; do not edit -->"
END = "<!-- END GENERATED -->"
DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def _apps() -> list[tuple[str, typer.Typer]]:
    from services.cli import cgate, cgctl, daemon

    return [("cachegate", daemon.app), ("cgctl", cgctl.app), ("cgate", cgate.app)]


def _commands(cmd, ctx, path: list[str]):
    """(path, command, context) of every visible command, depth first, in the CLI's order."""
    subs = getattr(cmd, "commands", None)
    if subs is None:
        yield path, cmd, ctx
        return
    for name in cmd.list_commands(ctx):
        sub = cmd.get_command(ctx, name)
        if sub is None or sub.hidden:
            continue
        sub_ctx = type(ctx)(sub, info_name=name, parent=ctx)
        yield from _commands(sub, sub_ctx, [*path, name])


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def command_paths() -> list[str]:
    """Every command, as typed: ``cgctl tokens add``."""
    out = []
    for prog, app in _apps():
        root = typer.main.get_command(app)
        ctx = root.context_class(root, info_name=prog)
        out += [" ".join(p) for p, _, _ in _commands(root, ctx, [prog])]
    return out


def reference() -> str:
    parts: list[str] = []
    for prog, app in _apps():
        root = typer.main.get_command(app)
        ctx = root.context_class(root, info_name=prog)
        parts.append(f"### {prog}\n")
        for path, cmd, cctx in _commands(root, ctx, [prog]):
            usage = " ".join([*path, *cmd.collect_usage_pieces(cctx)])
            parts.append(f"#### `{' '.join(path)}`\n")
            parts.append(f"```\n{usage}\n```\n")
            if cmd.help:
                parts.append(inspect.cleandoc(cmd.help).split("\f")[0].strip() + "\n")
            rows = []
            for param in cmd.get_params(cctx):
                rec = None if getattr(param, "hidden", False) else param.get_help_record(cctx)
                if rec is None or rec[0].startswith("--help"):
                    continue
                rows.append(f"| `{_cell(rec[0])}` | {_cell(rec[1])} |")
            if rows:
                parts.append("| Argument or option | What |\n|--------------------|------|\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def render(doc: str) -> str:
    """``doc`` with its generated part replaced by the current reference."""
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC}: the markers of the generated part are missing; put\n{BEGIN}\n{END}\n"
                         "where the reference goes")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{reference()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.cli.gendocs", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when docs/cli.md differs from the CLIs' --help")
    p.add_argument("--doc", type=Path, default=DOC, help="the file to write (default docs/cli.md)")
    args = p.parse_args(argv)
    old = args.doc.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print(f"{args.doc} is out of date with the CLIs' --help: run `python -m services.cli.gendocs`",
                  file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.doc.write_text(new)
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
