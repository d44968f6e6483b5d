"""The two-level extent map against a plain list of booleans, across page boundaries."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lazyiscsi.store.extentmap import PAGE_BYTES, UNITS_PER_PAGE, ExtentMap, PageState

SIZES = st.sampled_from([1, 7, 100, UNITS_PER_PAGE - 1, UNITS_PER_PAGE, UNITS_PER_PAGE + 3,
                         3 * UNITS_PER_PAGE + 17])


def _runs(ref: list[bool], start: int, end: int) -> list[tuple[int, int]]:
    out, i = [], start
    while i < end:
        if ref[i]:
            i += 1
            continue
        j = i
        while j < end and not ref[j]:
            j += 1
        out.append((i, j))
        i = j
    return out


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
