"""Run the Azure stand-in as a process.

    python -m services.azure_standin --state state.yaml --port 8443 --ca-out ca.pem \
        [--imds-port 8444] [--host 127.0.0.1] [--examples DIR] [--ready-file ready.json] [--keep-dir DIR]

Prints (and writes to --ready-file) a JSON line with base_url, authority_host, ca_file,
imds_url, identity_endpoint once listening. Drive it with the loopback-only control API under
``/_standin/`` (e.g. ``POST /_standin/keys {"resource": "<id or name>"}`` rotates keys).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from services.common.config import is_loopback

from .server import run_standin
from .state import StandinConfig, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.azure_standin", description=__doc__.splitlines()[0])
    p.add_argument("--state", help="YAML state file (see sample_state.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    p.add_argument("--port", type=int, default=0, help="HTTPS port (ARM, Entra ID); 0 = any free port")
    p.add_argument("--imds-port", type=int, default=0, help="plain-http managed identity port; 0 = any")
    p.add_argument("--ca-out", required=True, help="where to write the CA certificate (PEM)")
    p.add_argument("--examples", help="directory of Azure's published example responses to serve")
    p.add_argument("--ready-file", help="write the listening info (JSON) here once ready")
    p.add_argument("--keep-dir", help="keep the token signing key and the tokens issued here (0600), so a "
                                      "restarted stand-in accepts the tokens it issued before")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)

    if not is_loopback(args.host):
        p.error("the stand-in only listens on loopback (127.0.0.1, ::1, localhost)")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr)
    config = load_config(args.state) if args.state else StandinConfig()
    if args.examples:
        config.examples_dir = args.examples

    async def _run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_standin(
            config,
            host=args.host,
            port=args.port,
            imds_port=args.imds_port,
            ca_file=args.ca_out,
            ready_file=args.ready_file,
            stop_event=stop,
            keep_dir=args.keep_dir,
        )

    asyncio.run(_run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
