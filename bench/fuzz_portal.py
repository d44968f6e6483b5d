"""The portal fuzzer for longer than CI runs it: a ``lazyiscsi serve`` subprocess, one
well-behaved session checked throughout, and mutated PDU sessions plus fuzzed CDBs until
``--pdus`` PDUs were sent or ``--seconds`` passed (issue 14, acceptance item 3).

    .venv/bin/python bench/fuzz_portal.py [--pdus N] [--seconds S] [--lanes N] [--seed N]
    .venv/bin/python bench/fuzz_portal.py --replay SESSION_SEED...

Prints one summary line (and the problems, if any); exit status 1 when something broke. The
seed is printed first: the same seed makes the same sessions (as far as the daemon answers
them alike). ``--keep`` leaves the work directory (daemon log, greenlet samples) in place.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lazyiscsi.scsi.dispatch import HANDLERS
from tests.fuzz import campaign


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdus", type=int, default=None, help="stop after this many PDUs sent")
    parser.add_argument("--seconds", type=float, default=600.0, help="stop after this long (default 600)")
    parser.add_argument("--lanes", type=int, default=16, help="fuzzing sessions at a time (default 16)")
    parser.add_argument("--seed", type=int, default=None, help="the campaign's seed (default: random)")
    parser.add_argument("--log-level", default="info", help="the daemon's --log-level (default info)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--replay", type=int, nargs="+", default=(), metavar="SESSION_SEED",
                        help="run only these sessions (seeds from a failed run's list), one at a time")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    print(f"fuzz_portal seed={seed}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="fuzz-portal-"))

    def progress(stats, elapsed: float) -> None:  # type: ignore[no-untyped-def]
        if int(elapsed * 2) % 20 == 0:
            print(f"  {elapsed:6.1f}s pdus={stats.pdus} sessions={stats.connections}", file=sys.stderr,
                  flush=True)

    report = campaign.run(work, seed=seed, pdus=args.pdus, seconds=args.seconds, lanes=args.lanes,
                          opcodes=tuple(sorted(int(op) for op in HANDLERS)), log_level=args.log_level,
                          replay=tuple(args.replay), progress=progress)
    print(report.summary())
    problems = report.problems()
    for p in problems:
        print(f"  problem: {p}")
    for note in report.framing_notes[:5]:
        print(f"  note (a session with a damaged login): {note}")
    if problems:
        print(f"  recent session seeds: {report.recent_seeds}")
    if args.keep or problems:
        print(f"  work directory: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
