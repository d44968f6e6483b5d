"""Where the guest has been reading lately: what the background copier should copy next.

The copier's fallback order is the LUN's (LBA order); a guest that boots or opens files reads
somewhere else, and every unit it misses costs a round trip. This module records the guest's
reads while the disk is not yet complete and hands the copier *hot* runs before its cursor
(issue 15, after the seed paper's "prefetches not-yet-cached blocks"):

* **Neighbourhoods.** A miss that continues no stream marks its ``NEIGHBOURHOOD``-aligned
  region hot (spatial locality: the blocks around a file the guest opened are the rest of that
  file, its inode table, its directory). The copier fetches the whole region in one run when it
  has a slot free, so the guest's next read there is local. The most recent miss goes first: it
  is the likeliest to be followed by more. A miss that continues a stream adds none: the
  stream's read-ahead covers what comes next, and a long stream's misses would otherwise push
  every other region back.
* **Sequential streams.** A read that starts where an earlier one of the same stream ended (or
  inside what was read ahead for it) continues that stream. Once a stream is seen to be
  sequential it gets a read-ahead of ``READAHEAD_FIRST`` past its last read, handed out in runs
  of at most ``NEIGHBOURHOOD``; each time the guest reads past the middle of what was handed out
  (the data was there when it came: a hit) the read-ahead doubles, up to ``READAHEAD_MAX``, as
  Linux's readahead grows its window at its PG_readahead marker. A read that continues no
  stream starts a new one at ``READAHEAD_FIRST``: that is the reset when a stream breaks.

Nothing here fetches: it only says *where*. The copier fetches through ``LazyDisk.populate``
at background priority, the one fill path (a unit already local or in flight is not read
again; before a live cutover the dirty units are left out by ``LazyDisk.missing_runs``), and a
guest's miss never waits behind it (its own foreground read, which never joins a background
flight; the price: a miss of units a hot run is still fetching reads them a second time, see
bench/REPORT.md). Memory is bounded whatever the guest does: at most ``MAX_STREAMS`` streams and
``MAX_REGIONS`` regions are remembered, the least recently used forgotten first; a forgotten
region is still copied, later, in LBA order.

Offsets here are bytes of the LUN.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass

#: The region a miss makes hot, and the largest run handed out at once: the hydrator's run size
#: (one request of a MiB fills a 20 ms WAN's round trip well without holding a slot for long).
NEIGHBOURHOOD = 1 << 20
#: Read-ahead of a stream once it is seen to be sequential: what a guest's own read-ahead of a
#: file typically asks next (Linux starts at 128 KiB), so the first guess moves little.
READAHEAD_FIRST = 256 << 10
#: The largest read-ahead of one stream. A guest streaming a large file makes the copier hand
#: out at most this much ahead of its last read, so a stream that stops has taken at most this
#: much of the link out of LBA order for data nobody asked for yet.
READAHEAD_MAX = 16 << 20
#: How many sequential streams are remembered (a guest with more concurrent sequential readers
#: loses read-ahead for the least recently read). A peer-controlled bound: each read walks them.
MAX_STREAMS = 8
#: How many hot regions wait for the copier; a burst of misses over more regions forgets the
#: oldest (they are copied in LBA order instead). A peer-controlled bound on memory.
MAX_REGIONS = 64


class Why(enum.Enum):
    """Why a run is hot: the two kinds take turns (``Hotspots.next_run``)."""

    READAHEAD = "readahead"
    NEIGHBOURHOOD = "neighbourhood"


@dataclass
class Stream:
    """One sequential reader: ``pos`` is where its last read ended, ``ahead`` how far its
    read-ahead has been handed out, ``marker`` the point whose reading grows the window."""

    start: int  # where its most recent read began: a read past it, up to ``ahead``, continues
    pos: int
    window: int = READAHEAD_FIRST
    ahead: int = 0
    marker: int | None = None
    sequential: bool = False


@dataclass(frozen=True)
class HotRun:
    offset: int
    length: int
    why: Why


class Hotspots:
    """Records reads of a LUN of ``size`` bytes and hands out hot runs, bounded in memory."""

    def __init__(self, size: int, *, neighbourhood: int = NEIGHBOURHOOD,
                 readahead_first: int = READAHEAD_FIRST, readahead_max: int = READAHEAD_MAX,
                 max_streams: int = MAX_STREAMS, max_regions: int = MAX_REGIONS) -> None:
        self.size = size
        self._region = neighbourhood
        self._first = readahead_first
        self._max = readahead_max
        self._max_streams = max_streams
        self._max_regions = max_regions
        #: least recently used first
        self._streams: list[Stream] = []
        #: region index -> None, least recently missed first (an ordered set)
        self._regions: collections.OrderedDict[int, None] = collections.OrderedDict()
        #: which kind of hot run goes first next time (``next_run``)
        self._turn = Why.READAHEAD

    # -- what the disk tells -----------------------------------------------------------------

    def note_read(self, offset: int, length: int, missed: bool) -> None:
        """A guest read ``[offset, offset+length)``; ``missed``: some of it was not local."""
        end = offset + length
        s = self._stream_for(offset)
        if s is not None:
            s.start, s.pos = offset, max(s.pos, end)
            s.sequential = True
            if s.marker is not None and s.pos >= s.marker:
                s.window = min(self._max, s.window * 2)  # the read-ahead was read: a hit
                s.marker = None
            self._streams.remove(s)
            self._streams.append(s)
            return  # its read-ahead covers what comes next: no neighbourhood to guess
        if missed:
            if len(self._streams) >= self._max_streams:
                del self._streams[0]
            self._streams.append(Stream(start=offset, pos=end, window=self._first, ahead=end))
            for region in range(offset // self._region, -(-end // self._region)):
                self._regions[region] = None
                self._regions.move_to_end(region)
            while len(self._regions) > self._max_regions:
                self._regions.popitem(last=False)

    def _stream_for(self, offset: int) -> Stream | None:
        """The stream a read at ``offset`` continues: one whose last read it follows or
        overlaps forward, up to what was read ahead for it (reads of a guest with several
        commands in flight arrive a little out of order). Reading the same block again is
        no progress: it continues nothing."""
        for s in reversed(self._streams):
            if s.start < offset <= max(s.pos, s.ahead):
                return s
        return None

    # -- what the copier asks ----------------------------------------------------------------

    def next_run(self) -> HotRun | None:
        """The next hot run to copy, or None when nothing is hot. Read-ahead (of the most
        recently read stream first) and neighbourhoods (the most recently missed first) take
        turns: a reader streaming a large file must not hold back the blocks around a file
        another one just opened, nor the other way round. A run may already be local in part
        or whole: the copier copies only what is missing."""
        first, second = self._readahead, self._neighbourhood
        if self._turn is Why.NEIGHBOURHOOD:
            first, second = second, first
        run = first() or second()
        if run is not None:
            self._turn = Why.NEIGHBOURHOOD if run.why is Why.READAHEAD else Why.READAHEAD
        return run

    def _readahead(self) -> HotRun | None:
        for s in reversed(self._streams):
            run = self._take_readahead(s)
            if run is not None:
                return run
        return None

    def _neighbourhood(self) -> HotRun | None:
        if not self._regions:
            return None
        region, _ = self._regions.popitem(last=True)
        start = region * self._region
        return HotRun(start, min(self.size, start + self._region) - start, Why.NEIGHBOURHOOD)

    def _take_readahead(self, s: Stream) -> HotRun | None:
        if not s.sequential:
            return None
        target = min(self.size, s.pos + s.window)
        s.ahead = max(s.ahead, s.pos)
        if s.ahead >= target:
            return None
        if s.marker is None:
            s.marker = s.pos + s.window // 2
        end = min(target, s.ahead + self._region)
        run = HotRun(s.ahead, end - s.ahead, Why.READAHEAD)
        s.ahead = end
        return run

    @property
    def remembered(self) -> tuple[int, int]:
        """(streams, regions) held now: never more than the bounds."""
        return len(self._streams), len(self._regions)
