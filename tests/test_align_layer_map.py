"""Layer map L_t -> L_s: uniform / last / explicit, validation, and what stage 1 must store."""

import pytest

from alignment.mapping.layer_map import build_layer_map, layer_slots, teacher_layers_needed
from tests.helpers_align import single_thread  # noqa: F401 (autouse fixture)


def test_uniform_spreads_and_ends_at_last_layer():
    assert build_layer_map("uniform", 30, 4) == [7, 14, 22, 29]
    assert build_layer_map("uniform", 4, 3) == [1, 2, 3]
    assert build_layer_map("uniform", 6, 6) == list(range(6))
    m = build_layer_map("uniform", 2, 5)  # more student than teacher layers: repeats, all in range
    assert m[-1] == 1 and all(0 <= t < 2 for t in m) and m == sorted(m)


def test_last_and_explicit():
    assert build_layer_map("last", 30, 4) == [26, 27, 28, 29]
    assert build_layer_map([0, 3, 3], 4, 3) == [0, 3, 3]
    assert teacher_layers_needed([3, 0, 3]) == [0, 3]
    assert layer_slots([3, 0, 3], [0, 3]) == [1, 0, 1]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("middle", "layer_map='middle'"),
        ([0, 1], "expected 3 entries"),
        ([0, 1, 4], r"layer_map\[2\]=4"),
        ([0, -1, 2], r"layer_map\[1\]=-1"),
        ([0, 1.0, 2], r"layer_map\[1\]=1.0"),
    ],
)
def test_bad_specs_raise_one_line_errors(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        build_layer_map(spec, 4, 3)
    assert "\n" not in str(e.value)


def test_last_needs_enough_teacher_layers_and_slots_need_stored_layers():
    with pytest.raises(ValueError, match="layer_map='last'"):
        build_layer_map("last", 2, 3)
    with pytest.raises(ValueError, match="teacher layer 3"):
        layer_slots([0, 3], [0, 1, 2])
