"""``lazyiscsi`` as the fuzzer runs it: the same ``cli.main``, plus one greenlet that writes the
process's greenlet count to ``$LAZYISCSI_FUZZ_SAMPLES`` every ``$LAZYISCSI_FUZZ_INTERVAL``
seconds. The daemon exposes no greenlet count (and gains none for a test), so the count is
taken from the garbage collector, which tracks every greenlet, live or not yet collected.

    python -m tests.fuzz.sampled_serve [lazyiscsi arguments...]
"""

from __future__ import annotations

import gc
import os
import sys
import time

import gevent
import greenlet

from lazyiscsi import cli


def _sample(path: str, interval: float) -> None:
    with open(path, "a", buffering=1) as out:
        while True:
            count = sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet))
            out.write(f"{time.monotonic():.3f} {count}\n")
            gevent.sleep(interval)


def main() -> int:
    path = os.environ.get("LAZYISCSI_FUZZ_SAMPLES")
    if path:
        gevent.spawn(_sample, path, float(os.environ.get("LAZYISCSI_FUZZ_INTERVAL", "1")))
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
