"""train.objective / train.dpo keys: what loads, and the combinations refused before anything is built."""

import pytest

from vlm.config import load_config
from vlm.config_parsing import ConfigError


def test_dpo_keys_load_with_their_defaults():
    config = load_config(None, ["train.objective=dpo", "train.dpo.loss_type=ipo", "train.dpo.sft_weight=0.5"])
    assert config.train.objective == "dpo"
    assert (config.train.dpo.beta, config.train.dpo.loss_type, config.train.dpo.sft_weight) == (0.1, "ipo", 0.5)
    assert load_config(None, []).train.objective == "sft"


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.objective=dpo", "data.packing=true"], "set data.packing=false"),
    (["train.objective=dpo", "train.dpo.precompute_reference=true", "train.image_dropout=0.1"],
     "train.dpo.precompute_reference scores each pair once"),
    (["train.dpo.beta=0"], "train.dpo.beta must be > 0"),
    (["train.dpo.loss_type=hinge"], "train.dpo.loss_type"),
    (["train.objective=kto"], "train.objective"),
])
def test_refused_combinations_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)

