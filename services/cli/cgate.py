"""cgate: the user's tool. It talks only to dbproxy's public port."""

from __future__ import annotations

import typer

from services.common.version import VERSION

app = typer.Typer(help="Reach Redis databases through Cachegate.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)


@app.command()
def version():
    """Print the client version."""
    print(f"cgate v{VERSION}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
