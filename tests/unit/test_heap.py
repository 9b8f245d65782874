from __future__ import annotations

import gc

import pytest

from citytel.core.heap import collections_paused


def test_collections_pause_for_a_block_and_resume_after_it_even_when_it_raises() -> None:
    assert gc.isenabled()
    with collections_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError, match="the block failed"), collections_paused():
        raise ValueError("the block failed")
    assert gc.isenabled()


def test_a_pause_inside_a_disabled_collector_leaves_it_disabled() -> None:
    gc.disable()
    try:
        with collections_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
