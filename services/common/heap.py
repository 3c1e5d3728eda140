"""The garbage collector's settings for a long-running service, set once it has started.

CPython's collector looks at every tracked object of a generation when it runs. A service
that has started holds a few hundred thousand long-lived objects (modules, gRPC and protobuf
machinery, configuration, caches) that it will never free, and its hot paths (RESP in
dbproxy, audit batches in auth) make many short-lived containers: with the default
thresholds (700, 10, 10) the collector ran every few hundred of them and every hundredth
run walked the whole start-up heap. Measured in auth taking in audit batches under
``python -m bench``, the collector was about 7 % of its CPU.
"""

from __future__ import annotations

import gc

# Young collections after this many new container objects (the default is 700); the older
# generations as by default, every 20 younger collections. What the hot paths make is freed
# by reference counting long before that; what is left is what sessions and batches keep.
THRESHOLDS = (20_000, 20, 20)


def settle_after_start() -> None:
    """Move every object made so far out of the collector's view (``gc.freeze``) and collect
    less often (:data:`THRESHOLDS`). Call it once a service is serving; calling it again (two
    services in one process) only freezes what was made in between."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


__all__ = ["THRESHOLDS", "settle_after_start"]
