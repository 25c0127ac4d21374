"""Pagemap run logic: granule-aligned, physically contiguous runs.

Decoding a pagemap word is tested with the decoder, in test_procfs.py."""

from __future__ import annotations

from typing import List, Optional, Set, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aerate.agent import pagemap as pm

pytestmark = pytest.mark.unit


# --- examples ---------------------------------------------------------------------------


def test_one_aligned_hugepage_is_one_run() -> None:
    pfns: List[Optional[int]] = list(range(1024, 1024 + 512))
    assert pm.contiguous_runs(pfns, 512, first_index=100) == [pm.Run(100, 1024, 512)]


def test_misaligned_stretch_keeps_only_the_aligned_interior() -> None:
    # 1000 contiguous frames from 300: the only whole aligned granule is [512, 1024).
    pfns: List[Optional[int]] = list(range(300, 1300))
    assert pm.contiguous_runs(pfns, 512) == [pm.Run(212, 512, 512)]


def test_a_hole_or_a_jump_breaks_the_granule() -> None:
    hole: List[Optional[int]] = list(range(512, 1024))
    hole[7] = None
    assert pm.contiguous_runs(hole, 512) == []
    jump: List[Optional[int]] = list(range(512, 1024))
    jump[300] = 5000
    assert pm.contiguous_runs(jump, 512) == []


def test_adjacent_granules_merge_and_physically_separate_ones_do_not() -> None:
    pfns: List[Optional[int]] = [*range(2048, 2048 + 1024), *range(8192, 8192 + 512)]
    assert pm.contiguous_runs(pfns, 512) == [pm.Run(0, 2048, 1024), pm.Run(1024, 8192, 512)]


def test_coalesce_builds_a_1g_run_from_2m_blocks_in_any_order() -> None:
    gib = 262144
    blocks = [(gib + i * 512, 512) for i in range(512)]
    blocks.reverse()
    assert pm.coalesce(blocks, gib) == [pm.Extent(gib, gib)]
    # One block missing: no 1 GiB run survives, the 2 MiB runs still do.
    assert pm.coalesce(blocks[1:], gib) == []
    assert pm.coalesce(blocks[1:], 512) == [pm.Extent(gib, gib - 512)]


def test_coalesce_joins_overlaps_once() -> None:
    assert pm.coalesce([(0, 512), (256, 512), (0, 512)], 512) == [pm.Extent(0, 512)]


def test_bad_granule_is_refused() -> None:
    with pytest.raises(ValueError):
        pm.contiguous_runs([1], 0)
    with pytest.raises(ValueError):
        pm.coalesce([(0, 1)], 0)


# --- properties -------------------------------------------------------------------------


def eligible(pfns: List[Optional[int]], granule: int) -> Set[int]:
    """Brute force: page i is eligible when its whole aligned granule is mapped in order."""
    out: Set[int] = set()
    for i, pfn in enumerate(pfns):
        if pfn is None:
            continue
        start = i - pfn % granule
        base = pfn - pfn % granule
        if start < 0 or start + granule > len(pfns):
            continue
        if all(pfns[start + k] == base + k for k in range(granule)):
            out.add(i)
    return out


@st.composite
def page_maps(draw: st.DrawFn) -> Tuple[List[Optional[int]], int]:
    """Page maps made of stretches (contiguous, jumps, holes), plus a small granule."""
    granule = draw(st.sampled_from([1, 2, 4, 8, 16]))
    pfns: List[Optional[int]] = []
    for _ in range(draw(st.integers(0, 8))):
        length = draw(st.integers(1, 40))
        if draw(st.booleans()):
            pfns.extend([None] * length)
        else:
            start = draw(st.integers(1, 400))
            pfns.extend(range(start, start + length))
    return pfns, granule


@settings(max_examples=400, deadline=None)
@given(page_maps(), st.integers(0, 1000))
def test_runs_are_aligned_contiguous_disjoint_and_exact(
    case: Tuple[List[Optional[int]], int], first_index: int
) -> None:
    pfns, granule = case
    runs = pm.contiguous_runs(pfns, granule, first_index)
    covered: Set[int] = set()
    for run in runs:
        assert run.pfn % granule == 0 and run.nr_pages % granule == 0 and run.nr_pages > 0
        for k in range(run.nr_pages):
            i = run.index - first_index + k
            assert pfns[i] == run.pfn + k  # contiguous in both spaces
            assert i not in covered  # disjoint
            covered.add(i)
    assert covered == eligible(pfns, granule)
    # Maximal: no two runs could have been one.
    for a, b in zip(runs, runs[1:]):
        assert not (a.index + a.nr_pages == b.index and a.pfn + a.nr_pages == b.pfn)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), max_size=12),
    st.sampled_from([1, 2, 4, 8, 32]),
)
def test_coalesce_is_sorted_disjoint_and_exact(
    extents: List[Tuple[int, int]], granule: int
) -> None:
    out = pm.coalesce(extents, granule)
    union = {pfn for start, nr in extents for pfn in range(start, start + nr)}
    want = {
        pfn
        for pfn in union
        if all(b in union for b in range(pfn - pfn % granule, pfn - pfn % granule + granule))
    }
    got: Set[int] = set()
    for prev, ext in zip(out, out[1:]):
        assert prev.pfn + prev.nr_pages < ext.pfn  # sorted, disjoint, and never touching
    for ext in out:
        assert ext.pfn % granule == 0 and ext.nr_pages % granule == 0 and ext.nr_pages > 0
        got.update(range(ext.pfn, ext.pfn + ext.nr_pages))
    assert got == want
