"""LSN and Checkpoint value types: parse, format, order, key."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgcapture import LSN, Checkpoint
from pgcapture.errors import ConfigError

lsns = st.integers(min_value=0, max_value=(1 << 64) - 1)
seqs = st.integers(min_value=0, max_value=(1 << 32) - 1)


def test_lsn_formats_like_postgresql() -> None:
    assert str(LSN((0x16 << 32) | 0xB374D848)) == "16/B374D848"
    assert str(LSN(0)) == "0/0"
    assert LSN.parse("16/b374d848") == (0x16 << 32) | 0xB374D848


@given(lsns)
def test_lsn_round_trips(value: int) -> None:
    assert LSN.parse(str(LSN(value))) == value


@pytest.mark.parametrize("text", ["", "16", "16/", "/1", "G/1", "1/2/3", "123456789/0"])
def test_lsn_rejects_malformed_text_with_a_clear_error(text: str) -> None:
    with pytest.raises(ConfigError, match="X/Y"):
        LSN.parse(text)


def test_lsn_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="outside"):
        LSN(1 << 64)


@given(lsns, seqs, lsns, seqs)
def test_checkpoint_key_order_is_checkpoint_order(a: int, b: int, c: int, d: int) -> None:
    x, y = Checkpoint(a, b), Checkpoint(c, d)
    assert (x < y) == (x.key() < y.key())
    assert (x < y) == ((a, b) < (c, d))
    assert Checkpoint.from_key(x.key()) == x


def test_checkpoint_key_is_fixed_width() -> None:
    assert Checkpoint(0x16B374D848, 3).key() == "00000016B374D848:00000003"
    assert str(Checkpoint(0x16B374D848, 3)) == "16/B374D848#3"


@pytest.mark.parametrize("key", ["", "1:2", "00000016B374D848-00000003", "x" * 25])
def test_checkpoint_rejects_malformed_keys(key: str) -> None:
    with pytest.raises(ConfigError, match="checkpoint key"):
        Checkpoint.from_key(key)


def test_checkpoint_rejects_out_of_range_seq() -> None:
    with pytest.raises(ValueError, match="seq"):
        Checkpoint(1, 1 << 32)
