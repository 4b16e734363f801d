"""``pymachined``: the service behind ``org.pymachine.machine1`` (started by
D-Bus activation through ``pymachined.service``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys


def run() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from machined.daemon.service import serve

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    run()
