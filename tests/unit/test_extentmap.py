"""The two-level extent map against a plain list of booleans, across page boundaries."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lazyiscsi.store.extentmap import PAGE_BYTES, UNITS_PER_PAGE, ExtentMap, PageState, only_in

SIZES = st.sampled_from([1, 7, 100, UNITS_PER_PAGE - 1, UNITS_PER_PAGE, UNITS_PER_PAGE + 3,
                         3 * UNITS_PER_PAGE + 17])


def _runs(ref: list[bool], start: int, end: int, want: bool = False) -> list[tuple[int, int]]:
    """Runs of ``want`` (missing by default) in the reference list."""
    out, i = [], start
    while i < end:
        if ref[i] != want:
            i += 1
            continue
        j = i
        while j < end and ref[j] == want:
            j += 1
        out.append((i, j))
        i = j
    return out


def _fill(m: ExtentMap, ref: list[bool], data: st.DataObject, n: int) -> None:
    """Random set_local calls, a few of them large or page-aligned, and many short runs."""
    for _ in range(data.draw(st.integers(0, 40))):
        a = data.draw(st.integers(0, n - 1))
        longest = data.draw(st.sampled_from([1, 3, 64, 2 * UNITS_PER_PAGE]))
        b = data.draw(st.integers(a + 1, min(n, a + longest)))
        m.set_local(a, b)
        ref[a:b] = [True] * (b - a)


@settings(max_examples=300, deadline=None)
@given(n=SIZES, data=st.data())
def test_map_matches_reference(n: int, data: st.DataObject) -> None:
    m, ref = ExtentMap(n), [False] * n
    for _ in range(data.draw(st.integers(1, 12))):
        a = data.draw(st.integers(0, n - 1))
        b = data.draw(st.integers(a + 1, min(n, a + 2 * UNITS_PER_PAGE)))
        newly = sum(1 for i in range(a, b) if not ref[i])
        assert m.set_local(a, b) == newly
        ref[a:b] = [True] * (b - a)
        s = data.draw(st.integers(0, n - 1))
        e = data.draw(st.integers(s, n))
        assert list(m.missing_runs(s, e)) == _runs(ref, s, e)
        assert m.local_units == sum(ref)
        assert m.complete == all(ref)
    # what take_dirty hands out for persistence rebuilds the same map
    again = ExtentMap(n)
    for page, raw in m.take_dirty().items():
        assert len(raw) == PAGE_BYTES
        again.load_page(page, raw)
    assert list(again.missing_runs(0, n)) == _runs(ref, 0, n)
    assert not m.take_dirty()


def test_full_and_empty_pages_hold_no_bits() -> None:
    """Memory: a finished or untouched page costs one byte, not 4 KiB of bits."""
    m = ExtentMap(4 * UNITS_PER_PAGE)
    m.set_local(0, UNITS_PER_PAGE + 5)
    assert m._state[0] == PageState.FULL and m._state[1] == PageState.PARTIAL
    assert m._state[2] == PageState.EMPTY and list(m._bits) == [1]
    m.set_local(UNITS_PER_PAGE, 2 * UNITS_PER_PAGE)
    assert not m._bits


@settings(max_examples=100, deadline=None)
@given(n=SIZES, data=st.data())
def test_scans_and_intersection_match_reference(n: int, data: st.DataObject) -> None:
    """missing_runs, only_in and intersect against lists of booleans, on pages that
    are empty, full and partial (short runs, runs crossing bytes and pages, the short last page)."""
    a, ref_a = ExtentMap(n), [False] * n
    b, ref_b = ExtentMap(n), [False] * n
    _fill(a, ref_a, data, n)
    _fill(b, ref_b, data, n)
    s = data.draw(st.integers(0, n - 1))
    e = data.draw(st.integers(s, n))
    assert list(a.missing_runs(s, e)) == _runs(ref_a, s, e)
    a_not_b = [x and not y for x, y in zip(ref_a, ref_b, strict=True)]
    assert list(only_in(a, b, s, e)) == _runs(a_not_b, s, e, want=True)
    a.take_dirty()
    before = {p: a.page_bytes(p) for p in range(a.n_pages)}
    a.intersect(b)
    both = [x and y for x, y in zip(ref_a, ref_b, strict=True)]
    assert list(a.missing_runs(0, n)) == _runs(both, 0, n)
    assert a.local_units == sum(both)
    # exactly the pages whose image changed are handed out for rewriting
    dirty = a.take_dirty()
    assert set(dirty) == {p for p in range(a.n_pages) if a.page_bytes(p) != before[p]}
    assert all(dirty[p] == a.page_bytes(p) for p in dirty)


@settings(max_examples=100, deadline=None)
@given(n=SIZES, data=st.data())
def test_clear_matches_reference(n: int, data: st.DataObject) -> None:
    """Cutover invalidation (issue 11): bits go back to 0, pages change state and become dirty."""
    emap, ref = ExtentMap(n), [False] * n
    for _ in range(6):
        a = data.draw(st.integers(0, n - 1))
        b = data.draw(st.integers(a, n))
        if data.draw(st.booleans()):
            emap.set_local(a, b)
            ref[a:b] = [True] * (b - a)
        else:
            emap.take_dirty()
            was = sum(ref[a:b])
            assert emap.clear(a, b) == was
            ref[a:b] = [False] * (b - a)
            if was:
                assert emap.take_dirty()
        assert emap.local_units == sum(ref)
        assert list(emap.missing_runs(0, n)) == _runs(ref, 0, n)

