"""Generation settings overridden for one call: sampling implied by its settings, a bad value named."""

from __future__ import annotations

import pytest

from lora_tune.errors import OptionError
from lora_tune.inference.chat import with_generation
from lora_tune.inference.load import LoadedModel
from lora_tune.recipe.schema import EvalConfig

LOADED = LoadedModel(model=None, tokenizer=None, settings=EvalConfig(max_new_tokens=32), description="a model")


def test_a_temperature_or_top_p_implies_sampling_and_nothing_given_changes_nothing():
    assert with_generation(LOADED) is LOADED
    assert with_generation(LOADED, max_new_tokens=4).settings.do_sample is False
    sampled = with_generation(LOADED, top_p=0.5).settings
    assert sampled.do_sample and sampled.top_p == 0.5 and sampled.max_new_tokens == 32
    assert with_generation(LOADED, sample=True).settings.do_sample


def test_a_bad_setting_is_an_option_error_naming_it():
    with pytest.raises(OptionError, match="^temperature: Input should be greater than 0") as refused:
        with_generation(LOADED, temperature=-1.0)
    assert refused.value.option == "temperature"
