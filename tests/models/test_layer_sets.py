"""The one layer-set syntax (megatron_avar.models.layer_sets): every option that names decoder layers reads it
the same way, with today's spellings ("all", "middle", "A-B", "i,j", YAML lists)."""

import pytest

from megatron_avar.models.layer_sets import check_layer_set, middle_layers, parse_layers


@pytest.mark.parametrize("spec,expected", [
    ("all", (0, 1, 2, 3, 4, 5)), ("ALL", (0, 1, 2, 3, 4, 5)), ("middle", middle_layers(6)), ("2-4", (2, 3, 4)),
    ("0, 5", (0, 5)), ("0-1,4", (0, 1, 4)), ([5, 1, 1], (1, 5)), ((3,), (3,)), (2, (2,)),
])
def test_spellings(spec, expected):
    assert parse_layers(spec, 6) == expected


@pytest.mark.parametrize("spec,message", [
    ("last_half", "cannot read 'last_half'"), ("4-2", "cannot read '4-2'"), ("", "cannot read ''"),
    ([], "int indexes, at least one"), ([1, "2"], "int indexes, at least one"), (True, "not a layer set"),
    (1.5, "not a layer set"),
])
def test_bad_spellings_are_refused_without_the_model(spec, message):
    with pytest.raises(ValueError, match=message):
        check_layer_set(spec, field="avar.layers")


def test_out_of_range_names_the_field_the_layer_and_the_depth():
    with pytest.raises(ValueError, match=r"reward.visual_layers \[1, 9\]: layer 9 is out of range; this model has 6 "
                                         r"decoder layers \(0-5\)"):
        parse_layers([1, 9], 6, field="reward.visual_layers")
    with pytest.raises(ValueError, match="layer set '-1': layer -1 is out of range"):
        parse_layers("-1", 6)
    with pytest.raises(ValueError, match="layer set '4-8': layer 6 is out of range"):
        parse_layers("4-8", 6)


def test_every_option_uses_the_one_syntax():
    from megatron_avar.grpo.rewards import RewardConfig
    from megatron_avar.training.objective import AGTOConfig

    for spec in ("all", "middle", "1-3", "0,2", [3, 0]):
        expected = parse_layers(spec, 6)
        assert AGTOConfig(layers=spec).layer_indexes(6) == expected
        assert RewardConfig(visual_layers=spec).layer_indexes(6) == expected
