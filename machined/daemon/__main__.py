"""``pymachined``: the service behind ``org.pymachine.machine1`` (started by
D-Bus activation through ``pymachined.service``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys


def run() -> None:
    # asyncio imports ssl when it can (OpenSSL: ~4 MB of the daemon's Pss, 16 -> 12
    # MB idle); pymachined speaks D-Bus on a local socket only, never TLS.
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from machined.daemon.service import serve

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    run()
