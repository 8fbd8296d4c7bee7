"""benchmarks/tune.py: the validation split, the search and its budget, and trials on
untrained tiny backbones (conftest.py) that learn from the fit cases only."""

import dataclasses
import json
import subprocess
import sys

import pytest

from unike.config import ConfigError, load_config
from unike.data import DataError, edit_sample, load_cases
from unike.grid import SPLIT_FILES, TASKS
from unike.method.encoders import EncoderConfig, pretrain_encoders
from unike.method.knowledge import (collect_triplets, extract_hidden_states, load_triplets, save_hidden_states,
                                    save_triplets)

from conftest import REPO, make_backbone

sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark scripts import each other by name
from summary import tuning_section, unfinished_section  # noqa: E402
from tune import (TRIALS, TrialLog, ValidationSplit, _update_json, coordinate_search, search_space,  # noqa: E402
                  split_by_fact, tune)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _cases(world_dir, task, split):
    return load_cases(world_dir / SPLIT_FILES[(task, split)], task, world_dir)


def _split(world_dir, world_config, text_model, root, **knowledge) -> ValidationSplit:
    fit, validation = {}, {}
    for task in TASKS:
        fit[task], validation[task] = split_by_fact(_cases(world_dir, task, "train"), 0.2, 0)
    return ValidationSplit(make_backbone(world_config, text_model), fit, validation, root, 0,
                           backbone_settings=f"hash-{text_model}", **knowledge)


def test_validation_split_holds_whole_facts_and_never_an_eval_case(world_dir):
    for task in TASKS:
        train, evaluated = _cases(world_dir, task, "train"), _cases(world_dir, task, "eval")
        # Three cases a fact, so a split by case would cut facts.
        grouped = [dataclasses.replace(c, fact_id=f"fact-{i // 3}") for i, c in enumerate(train * 3)]
        for cases in (train, grouped):
            fit, validation = split_by_fact(cases, 0.2, 0)
            assert (fit, validation) == split_by_fact(cases, 0.2, 0)  # seeded
            assert sorted(map(id, fit + validation)) == sorted(map(id, cases))
            assert not {c.fact_id for c in fit} & {c.fact_id for c in validation}
            # facts join until they hold a fifth of the cases (rounded): at most one fact more
            assert round(0.2 * len(cases)) <= len(validation) < round(0.2 * len(cases)) + 3
        assert not {c.case_id for c in validation} & {c.case_id for c in evaluated}
        assert not {c.fact_id for c in validation} & {c.fact_id for c in evaluated}


def test_search_is_one_coordinate_pass_over_every_declared_value():
    score = {"a": {1: 0.0, 2: 0.5, 3: 0.2}, "b": {"x": 0.0, "y": 0.0, "z": 0.1}}
    seen = []

    def evaluate(values):
        seen.append(dict(values))
        return {"mean": sum(score[h][v] for h, v in values.items())}

    chosen, trials = coordinate_search({"a": 1, "b": "x"}, {"a": [1, 2, 3], "b": ["x", "y", "z"]}, evaluate)
    assert chosen == {"a": 2, "b": "z"}
    # a varies with b held at its start, then b with a at its best; the held point runs once
    assert seen == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}, {"a": 3, "b": "x"}, {"a": 2, "b": "y"},
                    {"a": 2, "b": "z"}]
    assert [t["hparams"] for t in trials] == seen and len(trials) == 1 + 2 + 2
    tied, _ = coordinate_search({"b": "y"}, {"b": ["y", "x"]}, evaluate)
    assert tied == {"b": "y"}  # a tie keeps the value held


def test_every_searched_method_of_the_config_has_the_same_budget():
    config = load_config(REPO / "config.yaml")
    searched = [m for m, e in config["methods"].items() if "search" in e]
    assert {"ft", "ke", "mend", "tpatcher", "ike", "serac", "unike"} <= set(searched)
    for method in searched:
        start, space = search_space(config, method)
        assert all(space[h][0] == v for h, v in start.items())  # the entry's own value joins each list
        assert 1 + sum(len(v) - 1 for v in space.values()) == TRIALS
    sequential = [m for m, e in config["methods"].items() if "sequential_search" in e]
    assert "mend" in sequential  # its drift_bound (baselines/mend.py)
    for method in sequential:
        _, space = search_space(config, method, "sequential_search")
        assert 1 + sum(len(v) - 1 for v in space.values()) == TRIALS


def _config(**entry) -> dict:
    return {"seed": 0, "methods": {"m": {"editor": "baselines.ft:FineTune", "hparams": {"lr": 1e-3}, **entry}}}


@pytest.mark.parametrize("entry, message", [
    ({}, "methods.m has no `search`"),
    ({"search": {"lrr": [1e-2]}}, r"methods.m.search: unknown hyperparameter\(s\) \['lrr'\] of FineTune; known: "),
    ({"search": {"lr": [1e-2, 1e-3]}}, f"methods.m.search: 2 trials .* every method gets {TRIALS}"),
    ({"search": {"lr": [1e-2] * 6}, "backbone_hparams": {"b": {"lr": 1e-4}}}, r"\['lr'\] also set per backbone"),
])
def test_a_search_entry_is_checked(entry, message):
    with pytest.raises(ConfigError, match=message):
        search_space(_config(**entry), "m")


def test_a_searched_value_that_makes_invalid_hyperparameters_is_refused_before_any_trial():
    # SERAC's labels: shuffle + vocab (0.5 by default) <= 1, so 0.95 can never run; stop 26's
    # search met it at its seventh trial and lost the six before.
    config = {"seed": 0, "methods": {"m": {"editor": "baselines.serac:SERAC", "hparams": {},
                                           "search": {"cf_label_shuffle": [0.1, 0.2, 0.3, 0.95, 0.45, 0.25]}}}}
    with pytest.raises(ConfigError, match=r"methods.m.search.cf_label_shuffle: 0.95 with the entry's other values "
                                          r"is invalid: SERAC: cf_label_shuffle and cf_label_vocab"):
        search_space(config, "m")


def test_a_hyperparameter_is_searched_one_step_or_in_sequence_not_both():
    config = _config(search={"lr": [1e-2] * 6}, sequential_search={"lr": [1e-4]})
    with pytest.raises(ConfigError, match=r"methods.m: \['lr'\] in both `search` and `sequential_search`"):
        search_space(config, "m", "sequential_search")
    with pytest.raises(ConfigError, match="methods.m has no `sequential_search`"):
        search_space(_config(search={"lr": [1e-2] * 6}), "m", "sequential_search")


def test_the_command_refuses_a_method_without_search_in_one_line():
    command = [sys.executable, str(REPO / "benchmarks" / "tune.py"), "--config", str(REPO / "config.yaml"),
               "--method", "backbone"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["tune.py: error: methods.backbone has no `search`: declare the "
                                                  "values to try per hyperparameter (docs/baselines.md, Tuning)"]


def test_trials_prepare_on_the_fit_cases_and_score_the_validation_cases(world_dir, world_config, tmp_path,
                                                                          monkeypatch):
    from baselines.tpatcher import TPatcher

    prepared_on = []
    original = TPatcher.prepare.__func__

    def spy(cls, backbone, hparams, train_cases, out_dir, seed):
        prepared_on.append({c.case_id for c in train_cases})
        return original(cls, backbone, hparams, train_cases, out_dir, seed)

    monkeypatch.setattr(TPatcher, "prepare", classmethod(spy))
    splits = {m: _split(world_dir, world_config, m, tmp_path / m) for m in ("opt", "llama")}
    config = {"seed": 0, "methods": {"tpatcher": {
        "editor": "baselines.tpatcher:TPatcher", "hparams": {"max_steps": 3, "memory_size": 200},
        "search": {"lr": [1e-3, 1e-1], "memory_weight": [1.0], "max_neurons": [1, 2, 3]}}}}
    record = tune(config, "tpatcher", splits)
    assert len(record["trials"]) == TRIALS
    assert [t["hparams"]["lr"] for t in record["trials"][:3]] == [1e-2, 1e-3, 1e-1]
    # T-Patcher's preparation reads every hyperparameter: one per trial, task and backbone
    assert len(prepared_on) == TRIALS * len(TASKS) * len(splits)
    fit = {c.case_id for s in splits.values() for cases in s.fit.values() for c in cases}
    held = {c.case_id for s in splits.values() for cases in s.validation.values() for c in cases}
    assert all(ids <= fit and not ids & held for ids in prepared_on)
    best = max(record["trials"], key=lambda t: t["mean"])
    assert record["chosen"] == best["hparams"]
    for t in record["trials"]:
        for name, scores in t["backbones"].items():
            assert scores["mean"] == pytest.approx(sum(scores[task]["mean"] for task in TASKS) / len(TASKS))
    assert record["backbones"]["opt"]["tasks"]["e-vqa"]["validation_cases"] == len(splits["opt"].validation["e-vqa"])
    lines = tuning_section(json.loads(json.dumps({"tpatcher": record})))  # as RESULTS.md shows tuning.json
    assert sum(line.startswith("| ") for line in lines) == 2 + TRIALS  # header, rule, one row a trial
    assert sum("**" in line for line in lines) == 1  # the chosen trial
    assert "Scored on backbones of settings hash llama hash-llama, opt hash-opt." in lines
    again = splits["opt"].score({"editor": "baselines.tpatcher:TPatcher",
                                 "hparams": {"max_steps": 3, "memory_size": 200, **best["hparams"]}}, "methods.tpatcher")
    assert again == best["backbones"]["opt"]  # seeded and deterministic


def test_knowledge_is_rebuilt_without_the_validation_cases(world_dir, world_config, tmp_path):
    backbone = make_backbone(world_config, "llama")
    train = [c for task in TASKS for c in _cases(world_dir, task, "train")]
    source = tmp_path / "knowledge"
    source.mkdir()
    triplets = collect_triplets(backbone, train, limit=100, max_new_tokens=3)
    save_triplets(source / "triplets.json", triplets)
    layers = list(range(len(backbone.text)))
    save_hidden_states(source / "hidden_states.safetensors", extract_hidden_states(backbone, triplets, layers), layers)
    encoders = EncoderConfig(truth_dim=8, hidden=32, steps=10, batch_size=8)
    pretrain_encoders(source, encoders)
    split = _split(world_dir, world_config, "llama", tmp_path / "tune", knowledge_source=source, encoders=encoders)
    entry = {"editor": "unike.method.editor:UniKE", "hparams": {"max_steps": 3, "memory_size": 200, "top_k": 2}}
    scores = split.score(entry, "methods.unike")
    rebuilt = load_triplets(split.knowledge() / "triplets.json")
    held = {(str(edit_sample(c).image), edit_sample(c).prompt) for cases in split.validation.values() for c in cases}
    assert split.triplets_removed > 0 and len(rebuilt) == len(triplets) - split.triplets_removed
    assert not {(t.image, t.prompt) for t in rebuilt} & held
    assert (split.knowledge() / "encoders.safetensors").is_file()
    assert set(scores) == {*TASKS, "mean"}


class _CannedSplit:
    """A validation split whose scores are given per (drift_bound, regime): what `tune`
    makes of them is under test, not the editing."""

    backbone_settings = "canned"

    def __init__(self, scores):
        self.scores, self.calls = scores, []

    def score(self, entry, owner, regime="one-step"):
        self.calls.append(regime)
        return {"mean": self.scores[entry["hparams"]["drift_bound"]][regime]}

    def summary(self):
        return {}


def test_a_sequential_search_scores_one_step_and_seq_10_alike():
    config = {"seed": 0, "methods": {"mend": {"editor": "baselines.mend:MEND", "hparams": {"drift_bound": 0.0},
                                              "sequential_search": {"drift_bound": [0.25, 0.5, 1.0, 2.0, 3.0, 4.0]}}}}
    # 4.0 is best one-step, 0.25 best in sequence; 1.0 has the best mean of the two.
    scores = {0.0: (0.9, 0.1), 0.25: (0.5, 0.9), 0.5: (0.6, 0.8), 1.0: (0.8, 0.7), 2.0: (0.9, 0.3), 3.0: (0.9, 0.2),
              4.0: (0.95, 0.1)}
    split = _CannedSplit({b: {"one-step": a, "seq-10": s} for b, (a, s) in scores.items()})
    record = tune(config, "mend", {"b": split}, sequential=True)
    assert record["regimes"] == ["one-step", "seq-10"] and len(record["trials"]) == TRIALS
    assert record["chosen"] == {"drift_bound": 1.0}
    trial = next(t for t in record["trials"] if t["hparams"] == {"drift_bound": 1.0})
    assert trial["backbones"]["b"] == {"one-step": {"mean": 0.8}, "seq-10": {"mean": 0.7}, "mean": pytest.approx(0.75)}
    assert split.calls.count("seq-10") == split.calls.count("one-step") == TRIALS


class _StoppingSplit(_CannedSplit):
    """Stops the search (as a kill or a crash would) once `limit` scores were asked for."""

    def __init__(self, scores, limit):
        super().__init__(scores)
        self.limit = limit

    def score(self, entry, owner, regime="one-step"):
        if len(self.calls) == self.limit:
            raise RuntimeError("stopped")
        return super().score(entry, owner, regime)


def test_a_stopped_search_resumes_from_the_trials_it_finished(tmp_path):
    config = {"seed": 0, "methods": {"mend": {"editor": "baselines.mend:MEND", "hparams": {"drift_bound": 0.0},
                                              "sequential_search": {"drift_bound": [0.25, 0.5, 1.0, 2.0, 3.0, 4.0]}}}}
    scores = {0.0: (0.9, 0.1), 0.25: (0.5, 0.9), 0.5: (0.6, 0.8), 1.0: (0.8, 0.7), 2.0: (0.9, 0.3), 3.0: (0.9, 0.2),
              4.0: (0.95, 0.1)}
    canned = {b: {"one-step": a, "seq-10": s} for b, (a, s) in scores.items()}
    log = tmp_path / "tuning-unfinished.json"
    with pytest.raises(RuntimeError, match="stopped"):  # three trials of two scores each, then the stop
        tune(config, "mend", {"b": _StoppingSplit(canned, limit=6)}, sequential=True, unfinished=log)
    logged = json.loads(log.read_text())["mend, seq-10"]["trials"]
    assert [t["hparams"]["drift_bound"] for t in logged] == [0.0, 0.25, 0.5]
    lines = unfinished_section(json.loads(log.read_text()))  # as RESULTS.md shows it until the search ends
    assert f"### mend, seq-10 (`baselines.mend:MEND`): 3 of {TRIALS} trials" in lines
    assert sum(line.startswith("| ") for line in lines) == 2 + 3
    rerun = _CannedSplit(canned)
    record = tune(config, "mend", {"b": rerun}, sequential=True, unfinished=log)
    assert len(rerun.calls) == 2 * (TRIALS - 3)  # only the trials the first run did not finish
    uninterrupted = tune(config, "mend", {"b": _CannedSplit(canned)}, sequential=True)
    assert record["chosen"] == uninterrupted["chosen"] == {"drift_bound": 1.0}
    assert [t["mean"] for t in record["trials"]] == [t["mean"] for t in uninterrupted["trials"]]
    # Trials scored on other backbones (another world or schedule) are never taken.
    elsewhere = _CannedSplit(canned)
    elsewhere.backbone_settings = "another world"
    tune(config, "mend", {"b": elsewhere}, sequential=True, unfinished=log)
    assert len(elsewhere.calls) == 2 * TRIALS
    # Another search (here: another start) never takes them.
    other = {**config["methods"]["mend"], "hparams": {"drift_bound": 4.0},
             "sequential_search": {"drift_bound": [0.0, 0.25, 0.5, 1.0, 2.0, 3.0]}}
    fresh = _CannedSplit(canned)
    tune({**config, "methods": {"mend": other}}, "mend", {"b": fresh}, sequential=True, unfinished=log)
    assert len(fresh.calls) == 2 * TRIALS
    TrialLog.forget(log, "mend, seq-10")  # what the command does once the record is written
    assert not log.exists()


def _add_entries(path, prefix, count):
    for i in range(count):
        _update_json(path, f"{prefix}{i}", {"trial": i})


def test_two_searches_at_once_keep_each_others_records(tmp_path):
    # Two tune.py processes (other methods, one per core) write the same two files: each
    # read-and-write is under the lock, so neither drops the other's entries.
    import multiprocessing

    path = tmp_path / "tuning.json"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_entries, args=(path, prefix, 150)) for prefix in ("ft-", "mend-")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [0, 0]
    entries = json.loads(path.read_text())
    assert sorted(entries) == sorted(f"{p}{i}" for p in ("ft-", "mend-") for i in range(150))
    _update_json(path, "ft-0", None)
    assert "ft-0" not in json.loads(path.read_text()) and len(json.loads(path.read_text())) == 299


def test_too_few_validation_cases_for_a_sequence_are_named(world_dir, world_config, tmp_path):
    split = _split(world_dir, world_config, "opt", tmp_path)
    with pytest.raises(DataError, match=r"e-vqa: \d+ validation cases make no seq-10 sequence"):
        split.score({"editor": "baselines.ft:FineTune", "hparams": {}}, "methods.ft", "seq-10")
