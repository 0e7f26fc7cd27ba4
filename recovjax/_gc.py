"""Keep the objects created by importing recovjax out of Python's cyclic GC.

Importing recovjax loads JAX, Flax, Optax, Orbax and TensorFlow Datasets:
a few hundred thousand module-level objects (functions, classes, caches)
that live until the interpreter exits. CPython's cyclic garbage collector
walks every one of them in each full collection, and again, several times,
while the interpreter shuts down. On a 2-core machine that costs about a
second per process: full collections during the import and during the
first traces, and most of the time between a script's last line and its
exit. :func:`gc.freeze` moves the objects that exist at that moment into a
permanent generation the collector skips. They are still freed by
reference counting like any other object; only a reference cycle among
them would no longer be collected, and import-time objects live for the
whole process anyway. Objects created afterwards (traces, results, user
data) are collected as usual.

Set ``RECOVJAX_GC_FREEZE=0`` (or ``false``/``off``/``no``) to leave the
collector untouched.
"""

from __future__ import annotations

import gc
import os

FREEZE_ENV = "RECOVJAX_GC_FREEZE"
"""Environment variable: ``0``/``false``/``off``/``no`` skips the freeze."""


def freeze_import_objects() -> bool:
    """Move every object tracked by the GC into its permanent generation.

    Called once, at the end of ``import recovjax``.

    Returns:
        Whether the objects were frozen (``False`` when
        ``$RECOVJAX_GC_FREEZE`` turns it off).
    """
    if os.environ.get(FREEZE_ENV, "").strip().lower() in ("0", "false",
                                                          "off", "no"):
        return False
    gc.freeze()
    return True
