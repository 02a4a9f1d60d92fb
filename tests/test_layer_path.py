"""LayerPath: parsing, canonical text, RYS construction and validation messages."""

from __future__ import annotations

import re

import pytest

from circuit_finder import LayerPath, LayerPathError


def test_parse_ranges_and_indices():
    p = LayerPath.parse("0..14,12,13,14,15..39")
    assert len(p) == 43
    assert list(p)[:16] == list(range(15)) + [12]
    assert list(p)[-25:] == list(range(15, 40))


@pytest.mark.parametrize("text", ["0..14,12,13,14,15..39", "0,1", "3", "5,4,3", "0..2,2..4", "7,7,7"])
def test_canonical_text_roundtrips(text):
    p = LayerPath.parse(text)
    assert LayerPath.parse(str(p)) == p
    assert str(LayerPath.parse(str(p))) == str(p)


def test_canonical_form_is_compact():
    assert str(LayerPath.parse("0..14,12,13,14,15..39")) == "0..14,12..39"
    assert str(LayerPath.parse("0,1,2,3")) == "0..3"
    assert str(LayerPath.parse("4,5")) == "4,5"


def test_comma_free_spellings():
    ref = LayerPath.parse("0..3,2,3,4..5")
    assert LayerPath.parse("0..3;2;3;4..5") == ref
    assert LayerPath.parse("0..3+2+3+4..5") == ref
    assert LayerPath.parse("0..3 2 3 4..5") == ref


def test_identity_and_duplicate():
    assert list(LayerPath.identity(4)) == [0, 1, 2, 3]
    assert list(LayerPath.duplicate(6, 2, 4)) == [0, 1, 2, 3, 2, 3, 4, 5]
    assert list(LayerPath.duplicate(6, 2, 4, times=3)) == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]
    assert LayerPath.duplicate(6, 2, 4, times=1) == LayerPath.identity(6)
    assert LayerPath.duplicate(30, 10, 13).extra_layers(30) == 3


def test_hash_eq_and_repr():
    a, b = LayerPath.parse("0..3"), LayerPath([0, 1, 2, 3])
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert repr(a) == "LayerPath('0..3')"


@pytest.mark.parametrize(
    "text, match",
    [("", "empty"), ("1,x", "'x'"), ("1..", "missing a layer index"), ("5..3", "descending"),
     ("-1", "'-1'"), ("1.5", "'1.5'"), ("1...3", "'1...3'"), (",,", "empty")],
)
def test_malformed_text(text, match):
    with pytest.raises(LayerPathError, match=match):
        LayerPath.parse(text)


@pytest.mark.parametrize(
    "text, item",
    [("0..3,,2", 2), ("0..3,", 2), (",0..3", 1), ("0..3+", 2), ("0..3;;1", 2), ("0..3, ,2", 2), ("0..3,+2", 2),
     ("1 2 ;", 3), (" ; 1", 1)],
)
def test_empty_item_is_named(text, item):
    with pytest.raises(LayerPathError, match=rf"layer path '{re.escape(text)}': item {item} is empty"):
        LayerPath.parse(text)


@pytest.mark.parametrize("text", ["0..3, 4", "0..3 ,4", " 0..3 , 4 ", "0..3\t;\n4", "0..3 + 4", "0..3  4"])
def test_whitespace_around_a_separator_is_fine(text):
    assert LayerPath.parse(text) == LayerPath.parse("0..3,4")


def test_validation_names_index_and_layer_count():
    with pytest.raises(LayerPathError, match=r"slot 3: layer index 9 .* 6 layers"):
        LayerPath.parse("0,1,2,9").validate(6)
    with pytest.raises(LayerPathError, match="start < end"):
        LayerPath.duplicate(6, 4, 4)
    with pytest.raises(LayerPathError, match="times"):
        LayerPath.duplicate(6, 1, 3, times=0)
    with pytest.raises(TypeError):
        LayerPath.parse(3)
