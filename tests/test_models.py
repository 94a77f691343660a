"""The model zoo: exact parameter counts of the reproductions, output shapes, the 8k budget, RF."""

import pytest
import torch

import models
from models.receptive import receptive_fields

# Parameter counts as the write-ups' tables and code give them.
REFERENCE_COUNTS = {"ref6712": 6712, "ref7998": 7998, "ref7936": 7936, "ref5178": 5178, "ref7944": 7944}


@pytest.mark.parametrize("name, count", REFERENCE_COUNTS.items())
def test_reproductions_have_the_exact_parameter_count(name, count):
    assert models.num_params(models.get_model(name)) == count


@pytest.mark.parametrize("name", models.list_models())
def test_every_variant_maps_a_batch_to_ten_class_scores(name):
    model = models.get_model(name).eval()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("name", ["step2", "step3", "step4", "step5", "tiny", "tiny4k", "tiny3k"])
def test_light_variants_are_under_budget(name):
    assert models.num_params(models.get_model(name)) < 8000


def test_tiny_beats_the_smallest_write_up_model_and_tiny4k_is_the_stretch():
    assert models.num_params(models.get_model("tiny")) < 5000
    assert models.num_params(models.get_model("tiny4k")) < 4000
    assert models.num_params(models.get_model("tiny3k")) < 3000


def test_registry_lookup_and_unknown_names():
    assert models.list_models()[:5] == ["step1", "step2", "step3", "step4", "step5"]
    with pytest.raises(models.UnknownModel, match="valid names: step1"):
        models.get_model("lenet")


def test_recipe_defaults_and_dropout_override():
    variant = models.get_variant("step5")
    assert variant.recipe["augment"] == "standard" and variant.recipe["dropout"] > 0
    layers = variant.build(dropout=0.2).modules()
    dropouts = [m.p for m in layers if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d))]
    assert dropouts and set(dropouts) == {0.2}


def final_rf(name):
    return receptive_fields(models.get_model(name))[-1][2]


def test_receptive_field_matches_hand_computed_values():
    # write-up 000 (ref6712), by hand: convs 3x3 at jump 1 -> 3, 5, (1x1) 5; maxpool 2 -> 6, jump 2;
    # three 3x3 -> 10, 14, 18; padded 3x3 -> 22; AvgPool(6) at jump 2 -> 22 + 5*2 = 32.
    rows = {name: rf for name, _, rf, _ in receptive_fields(models.get_model("ref6712"))}
    assert [rows[i] for i in ("0", "4", "8", "9", "10", "14", "18", "22", "26", "27")] == [
        3, 5, 5, 6, 10, 14, 18, 22, 32, 32,
    ]  # fmt: skip
    # write-up 002 model 3 (ref5178): 3, 5, pool 6 (jump 2), 10, 14, pool 16 (jump 4), 24, 2x2 -> 28.
    assert final_rf("ref5178") == 28
    assert final_rf("step5") == 28  # GAP over the 6x6 map at jump 2: 18 + 5*2
