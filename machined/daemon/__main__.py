"""``pymachined``: the service behind ``org.pymachine.machine1`` (started by
D-Bus activation through ``pymachined.service``)."""

from __future__ import annotations

import sys

# asyncio imports ssl when it can (OpenSSL: ~4 MB of the daemon's idle Pss);
# pymachined speaks D-Bus on a local socket only, never TLS. Before asyncio.
sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402


def run() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from machined.daemon.service import serve

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    run()
