import copy
from pathlib import Path

import pytest
import yaml

from unike.config import ConfigError, grid_cells, load_config
from unike.grid import Cell

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
    (lambda c: c["methods"].update(x={"editor": "baselines.missing:X"}), r"methods\.x: cannot load editor"),
    # a class that does not exist in an existing module: named with its method, not at DAG build
    (lambda c: c["methods"].update(x={"editor": "baselines.ft:NotAClass"}), r"methods\.x: cannot load editor "
                                                                             r"'baselines\.ft:NotAClass'"),
    (lambda c: c["methods"]["ike"].update(paper_name="ft"), r"paper_name\(s\) \['ft'\]"),
    # report.figure4: a misspelt method or backbone, two points at one x
    (lambda c: c["report"]["figure4"]["c"].append("fig4c-zeta-rnadom"), r"report\.figure4: unknown method name\(s\) "
                                                                        r"\['fig4c-zeta-rnadom'\]"),
    (lambda c: c["report"]["figure4"].update(backbone="tiny-llava"), r"report\.figure4\.backbone: unknown"),
    (lambda c: c["report"]["figure4"]["b"]["fixed"].append("fig4c-zeta-none"), r"report\.figure4\.b: .*has no "
                                                                               r"value of 'alpha'"),
    (lambda c: c["report"]["figure4"]["a"]["ike"].append("fig4a-ike-k8"), r"uniqueItems|non-unique|both have ike_k"),
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
    (lambda c: c["methods"]["ft"].update(backbone_hparams={"llava": {"lr": 1.0}}),
     r"methods\.ft\.backbone_hparams: unknown backbone name\(s\) \['llava'\]"),
    (lambda c: c["methods"]["ft"].update(backbone_hparams={"tiny-minigpt4": {"learning_rate": 1.0}}),
     r"methods\.ft on tiny-minigpt4: unknown hyperparameter"),
    # a per-backbone value can make a method non-stacking on that backbone only
    (lambda c: c["methods"]["unike"].update(backbone_hparams={"tiny-minigpt4": {"external": "ike", "zeta": "none"}}),
     r"methods\.unike .* cannot run regime"),
])
def test_bad_configs_fail_with_a_clear_message(config, mutate, message):
    bad = copy.deepcopy(config)
    mutate(bad)
    with pytest.raises(ConfigError, match=message):
        load_config(bad)


def test_backbone_hparams_merge_over_hparams_for_that_backbone_only(config):
    from unike.config import method_entry, methods_for
    from unike.editing import prepare_owners

    config["methods"]["tpatcher"]["backbone_hparams"] = {"tiny-minigpt4": {"lr": 0.5}}
    config["methods"]["tpatcher-copy"] = copy.deepcopy({k: v for k, v in config["methods"]["tpatcher"].items()
                                                        if k not in ("backbone_hparams", "paper_name")})
    loaded = load_config(config)
    base = config["methods"]["tpatcher"]["hparams"]
    assert method_entry(loaded, "tpatcher", "tiny-minigpt4")["hparams"] == {**base, "lr": 0.5}
    assert method_entry(loaded, "tpatcher", "tiny-blip2-opt")["hparams"] == base
    # the copy shares tpatcher's prepared folder only where their hyperparameters agree
    assert prepare_owners(methods_for(loaded, "tiny-blip2-opt"))["tpatcher-copy"] == "tpatcher"
    assert prepare_owners(methods_for(loaded, "tiny-minigpt4"))["tpatcher-copy"] == "tpatcher-copy"


def test_a_method_extends_its_base_across_config_files(config):
    """`base:` entries take their base's editor and hyperparameters after the overlays are
    merged, so an overlay's change to the base reaches every entry built on it."""
    from unike.config import merge_overlays, method_entry

    config["methods"]["k8"] = {"base": "ft", "hparams": {"steps": 8}}
    config["methods"]["k8-fast"] = {"base": "k8", "hparams": {"lr": 0.5}, "backbone_hparams": {"tiny-minigpt4": {}}}
    overlay = {"methods": {"ft": {"hparams": {"optimizer": "sgd"}, "backbone_hparams": {"tiny-minigpt4": {"lr": 2.0}}}}}
    loaded = load_config(merge_overlays(config, overlay))
    assert method_entry(loaded, "k8-fast", "tiny-blip2-opt") == {
        "editor": "baselines.ft:FineTune", "hparams": {**loaded["methods"]["ft"]["hparams"], "steps": 8, "lr": 0.5}}
    assert loaded["methods"]["ft"]["hparams"]["optimizer"] == "sgd"
    assert method_entry(loaded, "k8-fast", "tiny-minigpt4")["hparams"]["lr"] == 2.0  # the base's per-backbone value
    assert "paper_name" not in loaded["methods"]["k8"] and "base" not in loaded["methods"]["k8"]
    assert load_config(copy.deepcopy(loaded))["methods"] == loaded["methods"]  # resolving again changes nothing


@pytest.mark.parametrize("methods, message", [
    ({"a": {"base": "b"}, "b": {"base": "a"}}, r"methods\.b\.base: a cycle of bases: a -> b -> a"),
    ({"a": {"base": "rome"}}, r"methods\.a\.base: unknown method 'rome'"),
    ({"a": {"base": "ft", "editor": "baselines.ke:KnowledgeEditor"}}, r"methods\.a: editor .* differs from its base"),
])
def test_bad_bases_are_named(config, methods, message):
    config["methods"].update(methods)
    with pytest.raises(ConfigError, match=message):
        load_config(config)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(extra_seeds=[1, 1]), r"at extra_seeds: .*non-unique"),
    (lambda c: c.update(extra_seeds=[1, -2]), r"at extra_seeds/1: -2 is less than the minimum of 0"),
    (lambda c: c.update(extra_seeds=[1, "2"]), r"at extra_seeds/1: '2' is not of type 'integer'"),
    (lambda c: c.update(extra_seeds=[1, 2.5]), r"at extra_seeds/1: 2.5 is not of type 'integer'"),
    (lambda c: c.update(extra_seeds=[True]), r"at extra_seeds/0: True is not of type 'integer'"),
    (lambda c: c.update(extra_seeds=[2.0]), r"^extra_seeds\[0\]: 2.0 is not an integer$"),  # JSON Schema takes it
    (lambda c: c.update(extra_seeds=3), r"at extra_seeds: 3 is not of type 'array'"),
    (lambda c: c.update(extra_seeds=[1, 0]), r"^extra_seeds: 0 is already `seed`"),
    (lambda c: c.update(seed=-1), r"at seed: -1 is less than the minimum of 0"),
    (lambda c: c.update(seed=1.0), r"^seed: 1.0 is not an integer$"),
])
def test_bad_seeds_are_named(config, mutate, message):
    mutate(config)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(config)
    assert "\n" not in str(e.value)


def test_each_seed_has_its_own_chain_config_and_hashes(config):
    """An extra seed's chain is a single-seed run of that seed into out_dir/seed<n>: every
    rule's settings hash reads the seed, so seeds share no output; adding seeds changes no
    hash of `seed`'s chain, so a finished single-seed run is reused."""
    from unike import config as settings
    from unike.grid import Layout

    single = load_config(copy.deepcopy(config))
    config["extra_seeds"] = [1, 2]
    seeded = load_config(config)
    assert settings.seeds(seeded) == [0, 1, 2] and settings.seeds(single) == [0]
    one = settings.seed_config(seeded, 1)
    assert one["seed"] == 1 and one["out_dir"] == "results/seed1" and "extra_seeds" not in one
    assert Layout(one).world == Path("results/seed1/world") and Layout(seeded).world == Path("results/world")
    assert settings.seed_config(seeded, 0) is seeded
    with pytest.raises(ConfigError, match=r"seed 3 is neither"):
        settings.seed_config(seeded, 3)

    cell = Cell("unike", "tiny-minigpt4", "e-vqa", "one-step")
    hashes = [
        settings.world_settings,
        lambda c: settings.pretrain_settings(c, cell.backbone),
        lambda c: settings.model_settings(c, cell.backbone),
        lambda c: settings.eval_settings(c, cell.backbone, cell.task),
        lambda c: settings.pre_edit_settings(c, cell.backbone, cell.task),
        lambda c: settings.prepare_settings(c, cell.method, cell.backbone, cell.task),
        lambda c: settings.cell_settings(c, cell),
        *(lambda c, stage=stage: settings.knowledge_settings(c, cell.backbone, stage)
          for stage in settings.KNOWLEDGE_STAGE_KEYS),
    ]
    for of in hashes:
        per_seed = [settings.settings_hash(of(settings.seed_config(seeded, s))) for s in (0, 1, 2)]
        assert len(set(per_seed)) == 3
        assert per_seed[0] == settings.settings_hash(of(single))


def test_the_pre_edit_cache_reruns_when_its_streams_move_to_another_layer(config):
    """The streams are kept at UniKE's first edited layer: `knowledge.edited_layers` is part
    of cache_pre_edit's settings (an edit_eval cell reruns after it, its inputs being newer)."""
    from unike import config as settings

    before = settings.settings_hash(settings.pre_edit_settings(load_config(copy.deepcopy(config)), "tiny-minigpt4",
                                                               "e-vqa"))
    config["knowledge"]["edited_layers"] = 2
    after = settings.settings_hash(settings.pre_edit_settings(load_config(config), "tiny-minigpt4", "e-vqa"))
    assert before != after


@pytest.mark.parametrize("method,changed,reruns", [
    # beta scales zeta': read by UniKE, not by its variants without zeta or without neurons
    ("unike", {"beta": 0.7}, True),
    ("unike-intrin+latent-ike", {"beta": 0.7}, False),
    ("unike-only-latent-ike", {"beta": 0.7, "lr": 0.5, "n_neurons": 2}, False),
    ("unike-only-latent-ike", {"top_k": 4}, True),
    ("unike-only-intrin", {"top_k": 4, "ike_k": 4}, False),
    ("unike-only-intrin", {"lr": 0.5}, True),
    ("unike-intrin+ike", {"ike_k": 4}, True),
    ("unike-intrin+ike", {"top_k": 4}, False),
])
def test_a_cell_reruns_only_for_hyperparameters_its_editor_reads(config, method, changed, reruns):
    """Changing `unike`'s hyperparameters reaches every variant through `base:`; a variant's
    grid cells rerun (their settings hash changes) only where it reads what changed."""
    from unike import config as settings

    cell = Cell(method, "tiny-blip2-opt", "e-vqa", "one-step")
    before = settings.cell_config_hash(load_config(copy.deepcopy(config)), cell)
    config["methods"]["unike"]["hparams"].update(changed)
    after = settings.cell_config_hash(load_config(config), cell)
    assert (before != after) == reruns


def test_a_cell_hashes_the_values_its_editor_runs_with_defaults_included(config, monkeypatch):
    """A hyperparameter left at its default hashes as its value: writing the default out
    changes nothing, and a default changed in the code reruns the cells that read it."""
    import dataclasses

    from unike import config as settings
    from unike.method import editor as unike_editor

    cell = Cell("unike", "tiny-blip2-opt", "e-vqa", "one-step")
    default = unike_editor.UniKEHparams().memory_weight
    before = settings.cell_config_hash(load_config(copy.deepcopy(config)), cell)
    config["methods"]["unike"]["hparams"]["memory_weight"] = default
    assert settings.cell_config_hash(load_config(copy.deepcopy(config)), cell) == before
    del config["methods"]["unike"]["hparams"]["memory_weight"]
    changed = dataclasses.make_dataclass("UniKEHparams", [("memory_weight", float, default * 2)],
                                         bases=(unike_editor.UniKEHparams,), frozen=True)
    monkeypatch.setattr(unike_editor.UniKE, "Hparams", changed)
    assert settings.cell_config_hash(load_config(config), cell) != before
