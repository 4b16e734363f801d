"""Standard-library modules loaded on first use instead of at import.

``dataclasses`` imports ``inspect`` (with ``ast``, ``dis``, ``tokenize``:
~3.5 ms) for one thing: a signature for the docstring of a class that has
none (ours all have one). Every CLI call that reads a definition imports
dataclasses; none needs inspect. :func:`defer` puts a stand-in module in
``sys.modules`` (PEP 562 ``__getattr__``) that imports the real module on its
first attribute access and takes all of it over, so code that does use it
gets it whole. (``importlib.util.LazyLoader`` does not help on 3.11: the next
``import`` of the name reads ``__spec__`` and that loads it.)
"""

from __future__ import annotations

import importlib
import sys
import types


class _Deferred(types.ModuleType):
    def __getattr__(self, attribute: str) -> object:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        sys.modules[name] = real
        return getattr(real, attribute)


def defer(*names: str) -> None:
    """Make NAMES load on first attribute access (no-op for one already imported)."""
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = _Deferred(name)
