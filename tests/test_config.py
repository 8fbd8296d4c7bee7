import copy
from pathlib import Path

import pytest
import yaml

from unike.config import ConfigError, Cell, grid_cells, load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def config():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_default_config_is_valid_and_lists_the_grid(config):
    cells = grid_cells(load_config(config))
    assert Cell("ft", "tiny-minigpt4", "e-ic", "one-step") in cells
    assert len(cells) == len(set(cells))


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c["grid"][0]["methods"].append("rome"), "unknown method name"),
    (lambda c: c["grid"][0]["backbones"].append("llava"), "unknown backbone name"),
    (lambda c: c["grid"][0]["regimes"].append("seq-5"), "grid/0/regimes"),
    (lambda c: c["grid"].append({"methods": ["ft"], "backbones": ["tiny-minigpt4"], "tasks": ["e-vqa"],
                                 "regimes": ["cross-10"]}), "do not apply to task"),
    (lambda c: c["methods"].update(x={"editor": "baselines.missing:X"}), "not found"),
    (lambda c: c.update(surprise=1), "Additional properties"),
    (lambda c: c["data"].update(source="mmedit"), "tiny backbones need"),
    # a method that cannot stack edits, in a sequential cell: refused before any job runs
    (lambda c: c["grid"].append({"methods": ["ike"], "backbones": ["tiny-minigpt4"], "tasks": ["e-vqa"],
                                 "regimes": ["seq-10"]}), r"methods\.ike .* cannot run regime\(s\) \['seq-10'\]"),
    # the same UniKE editor stacks edits unless its hyperparameters make it Intrin+IKE
    (lambda c: c["grid"].append({"methods": ["unike-only-intrin", "unike-intrin+ike"], "backbones": ["tiny-minigpt4"],
                                 "tasks": ["cross-task"], "regimes": ["cross-10"]}),
     r"methods\.unike-intrin\+ike .* cannot run regime\(s\) \['cross-10'\]"),
    (lambda c: c["methods"]["unike"]["hparams"].update(n_neuron=3), r"methods\.unike.*unknown hyperparameter"),
])
def test_bad_configs_fail_with_a_clear_message(config, mutate, message):
    bad = copy.deepcopy(config)
    mutate(bad)
    with pytest.raises(ConfigError, match=message):
        load_config(bad)
