"""The hot-first ordering policy (``store/hotspots.py``): neighbourhoods of misses, sequential
read-ahead that grows while the guest reads what was read ahead and starts over when the stream
breaks, and memory bounded against a guest that misses everywhere."""

from __future__ import annotations

import random

from lazyiscsi.store.hotspots import (
    MAX_REGIONS,
    MAX_STREAMS,
    NEIGHBOURHOOD,
    READAHEAD_FIRST,
    READAHEAD_MAX,
    HotRun,
    Hotspots,
    Why,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def drain(h: Hotspots, limit: int = 10_000) -> list[HotRun]:
    runs = []
    while (run := h.next_run()) is not None:
        runs.append(run)
        assert len(runs) < limit, "next_run never ran dry"
    return runs


def test_a_miss_makes_its_neighbourhood_hot_newest_first() -> None:
    h = Hotspots(GiB)
    h.note_read(3 * MiB + 100, 4 * KiB, missed=True)
    h.note_read(700 * MiB, 4 * KiB, missed=True)
    h.note_read(200 * MiB, 4 * KiB, missed=False)  # a local read is no hotspot
    runs = drain(h)
    assert runs == [HotRun(700 * MiB, NEIGHBOURHOOD, Why.NEIGHBOURHOOD),
                    HotRun(3 * MiB, NEIGHBOURHOOD, Why.NEIGHBOURHOOD)]
    assert drain(h) == []  # handed out once


def test_a_miss_across_two_regions_makes_both_hot_and_the_last_region_is_clipped() -> None:
    size = 5 * MiB + 12 * KiB
    h = Hotspots(size)
    h.note_read(5 * MiB - 4 * KiB, 8 * KiB, missed=True)
    assert {(r.offset, r.length) for r in drain(h)} == {(4 * MiB, MiB), (5 * MiB, 12 * KiB)}


def test_a_single_miss_gets_no_read_ahead() -> None:
    h = Hotspots(GiB)
    h.note_read(10 * MiB, 64 * KiB, missed=True)
    assert [r.why for r in drain(h)] == [Why.NEIGHBOURHOOD]


def _readahead(runs: list[HotRun]) -> list[HotRun]:
    return [r for r in runs if r.why is Why.READAHEAD]


def test_sequential_stream_read_ahead_grows_while_it_hits_up_to_the_maximum() -> None:
    h = Hotspots(64 * GiB)
    step = 128 * KiB
    h.note_read(0, step, missed=True)
    h.note_read(step, step, missed=True)  # sequential now
    pos, ahead, leads = 2 * step, 2 * step, []
    for _ in range(2000):
        runs = _readahead(drain(h))
        assert runs, "a sequential reader that moved on got no read-ahead"
        assert runs[0].offset == ahead, "read-ahead skipped or repeated a range"
        assert all(r.length <= NEIGHBOURHOOD for r in runs)
        for r in runs:
            assert r.offset == ahead
            ahead = r.offset + r.length
        leads.append(ahead - pos)
        h.note_read(pos, step, missed=False)  # the guest reads what was read ahead: hits
        pos += step
    assert leads[0] == READAHEAD_FIRST
    assert leads == sorted(leads)  # never shrinks while the guest keeps reading it
    assert max(leads) == READAHEAD_MAX
    assert leads[-1] == READAHEAD_MAX  # stays at the maximum while it keeps hitting
    # each size on the way was a doubling of the one before
    sizes = sorted(set(leads))
    assert sizes == [READAHEAD_FIRST << i for i in range(len(sizes))]


def test_read_ahead_does_not_grow_when_the_guest_does_not_read_it() -> None:
    h = Hotspots(GiB)
    h.note_read(0, 64 * KiB, missed=True)
    h.note_read(64 * KiB, 64 * KiB, missed=True)
    first = _readahead(drain(h))
    assert sum(r.length for r in first) == READAHEAD_FIRST
    for _ in range(10):  # the copier asks again and again: nothing new without the guest
        assert _readahead(drain(h)) == []


def test_read_ahead_starts_over_when_the_stream_breaks() -> None:
    h = Hotspots(64 * GiB)
    step = 128 * KiB
    h.note_read(0, step, missed=True)
    pos = step
    for _ in range(200):  # grow the stream at 0 to its maximum
        drain(h)
        h.note_read(pos, step, missed=pos < 2 * step)
        pos += step
    drain(h)
    # the guest jumps elsewhere and reads sequentially from there
    far = 40 * GiB
    h.note_read(far, step, missed=True)
    h.note_read(far + step, step, missed=True)
    runs = _readahead(drain(h))
    assert runs[0].offset == far + 2 * step
    assert sum(r.length for r in runs) == READAHEAD_FIRST


def test_reading_the_same_block_again_is_no_stream() -> None:
    h = Hotspots(GiB)
    for _ in range(5):
        h.note_read(8 * MiB, 4 * KiB, missed=True)
    assert _readahead(drain(h)) == []


def test_reads_a_little_out_of_order_still_continue_the_stream() -> None:
    """A guest with several commands in flight: the second and third reads swapped."""
    h = Hotspots(GiB)
    h.note_read(0, 64 * KiB, missed=True)
    h.note_read(128 * KiB, 64 * KiB, missed=True)  # not a continuation: a second stream
    h.note_read(64 * KiB, 64 * KiB, missed=True)  # continues the first
    h.note_read(192 * KiB, 64 * KiB, missed=True)  # continues the second
    ra = _readahead(drain(h))
    assert ra and ra[0].offset == 256 * KiB


def test_memory_is_bounded_against_a_guest_that_misses_everywhere() -> None:
    """Hostile: misses all over a 64 TiB LUN, many short streams, never a break for the copier.
    Whatever it does, at most MAX_STREAMS streams and MAX_REGIONS regions are held, and each
    hand-out is at most a neighbourhood."""
    rnd = random.Random(15)
    size = 64 << 40
    h = Hotspots(size)
    for i in range(50_000):
        off = rnd.randrange(0, size - MiB) & ~4095
        h.note_read(off, rnd.choice([4096, 64 * KiB, MiB]), missed=True)
        if i % 3 == 0:
            h.note_read(off + 4096, 4096, missed=True)  # two-read streams everywhere
        streams, regions = h.remembered
        assert streams <= MAX_STREAMS and regions <= MAX_REGIONS
    runs = drain(h)
    assert len(runs) <= MAX_REGIONS + MAX_STREAMS * (READAHEAD_MAX // NEIGHBOURHOOD + 1)
    assert all(0 < r.length <= NEIGHBOURHOOD and r.offset + r.length <= size for r in runs)


def test_read_ahead_and_neighbourhoods_take_turns() -> None:
    """A stream's read-ahead (many runs once grown) does not hold back a burst of misses
    elsewhere: the copier gets one of each in turn while both have work."""
    h = Hotspots(GiB, readahead_first=8 * MiB)
    h.note_read(0, 64 * KiB, missed=True)
    h.note_read(64 * KiB, 64 * KiB, missed=True)  # a stream with 8 MiB of read-ahead to hand out
    for region in (500, 600, 700):
        h.note_read(region * MiB, 4096, missed=True)
    kinds = [r.why for r in drain(h)]
    assert kinds[:7] == [Why.READAHEAD, Why.NEIGHBOURHOOD] * 3 + [Why.READAHEAD]
    assert kinds.count(Why.NEIGHBOURHOOD) == 4  # the three, and the stream's own region 0


def test_a_streams_misses_do_not_push_other_regions_back() -> None:
    """A sequential reader that keeps missing adds no neighbourhoods past its first miss (its
    read-ahead is for that): the regions of a burst of misses elsewhere are not pushed back."""
    h = Hotspots(GiB)
    h.note_read(700 * MiB, 4096, missed=True)  # a burst elsewhere, first
    for i in range(64):  # then a stream that misses all the way through 8 MiB
        h.note_read(100 * MiB + i * 128 * KiB, 128 * KiB, missed=True)
    regions = [r.offset for r in drain(h) if r.why is Why.NEIGHBOURHOOD]
    assert regions == [100 * MiB, 700 * MiB]
