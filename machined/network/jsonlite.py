"""JSON decoding without ``import json``, for the clean-up that runs at every stop.

``json`` imports ``json.decoder`` and ``json.encoder``, which import ``re``
(with ``enum``, ``functools``, the regex compiler): ~4 ms of a bridged
machine's ``ExecStopPost=``, which reads two small JSON texts (its network
record and the nft table's listing) and writes none. The C scanner that
``json.loads`` itself uses (``_json.make_scanner``, CPython's accelerator,
what ``json.scanner`` wraps) decodes the same documents with the same
results; where it is missing, :mod:`json` does the work.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

_WHITESPACE = " \t\n\r"


def _no_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


class _Options:
    """What ``_json.make_scanner`` reads from a ``json.JSONDecoder``: its defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_no_constant)  # NaN/Infinity: nothing of ours writes them


def loads(text: str) -> Any:
    """``json.loads(text)`` for a ``str``; ValueError for text that is not one JSON document."""
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        from _json import make_scanner

        value, end = make_scanner(_Options)(text, start)
    except StopIteration as exc:
        raise ValueError(f"not JSON: nothing to decode at {exc.value}") from None
    except ValueError:
        raise
    except Exception:  # no _json, or one that wants more than these options: json does it
        import json

        return json.loads(text)
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"not JSON: extra data at {end}")
    return value
