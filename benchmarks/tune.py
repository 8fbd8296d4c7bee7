"""Every method's hyperparameters, searched on a validation split of the *train* data.

Calibrate the world, never the methods: each method, UniKE included, is tuned for its own
best score by the same procedure with the same budget, and the eval split is never read.

Validation split, per backbone and task: a seeded `VALIDATION_SHARE` of the task's train
cases (the backbone's own mistakes, mined by the DAG), held out by fact (`fact_id`): every
case of a held-out fact is on the validation side, so no method learns a fact it is scored
on. Everything a method learns from the train split is learnt from the rest only: its
`prepare` runs on the task's remaining cases (as `prepare_editor` runs on the whole task),
and a method that reads UniKE's knowledge folder (`Editor.needs_knowledge`) gets one
rebuilt without the validation cases (their triplets removed, encoders and zeta retrained).

Search: a method's config entry declares its space, `search: {hparam: [values]}`; the
entry's own value joins each list. One pass, coordinate-wise, in the declared order: each
hyperparameter takes each of its values with the others at their best so far, and the best
value is kept before the next one (a tie keeps the earlier value: the one held so far,
then the declared order). A method's search costs 1 + sum over its hyperparameters of
(values - 1) trials, and every method's space must come to the same `TRIALS`: a method
with fewer hyperparameters that matter spends the budget on more values of them (IKE: k).
Every declared value is checked with the entry's other values (the editor's `Hparams`)
before the first trial: an invalid one is named at once, not when its trial comes up.

Score of a trial: the mean of Rel, Gen and Loc (Gen and Loc each the mean of their T- and
M- parts, as Table 5) on one-step editing of the validation cases, per task, then the mean
over both tasks and over the backbones: one config entry serves every backbone.

Sequential search (`--sequential`): a hyperparameter that exists for sequences of edits (a
stability measure such as MEND's `drift_bound`) cannot be chosen one-step alone, where it
does nothing or only caps. A config entry declares those under `sequential_search:`;
`--sequential` runs the same pass with the same budget over them, the entry's other values
as config.yaml holds them (their one-step choice), and scores each trial by the mean of its
one-step score and its score on sequences of 10 validation edits (`seq-10`: every case
scored after its whole sequence, as the DAG's runs are): the measure acts in both regimes,
so it is chosen for both. Its record is `<method>, seq-10` in tuning.json.
Seeded and deterministic: torch is seeded before every `prepare` and every editor, as each
DAG job is.

Writes benchmarks/results/tuning.json (every trial and the choice, per method, each as its
search ends; other methods' records already there are kept) and prints what to change in
config.yaml, which it never writes. Each trial is logged as it ends in
tuning-unfinished.json (`TrialLog`): a search stopped midway and run again takes up where
it stopped. Needs a finished default run (`snakemake --cores 2`).

    python benchmarks/tune.py --config config.yaml --method ft --method mend
    python benchmarks/tune.py --config config.yaml --method unike --backbones tiny-minigpt4
    python benchmarks/tune.py --config config.yaml --method mend --sequential
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from unike.backbones import Backbone
from unike.cli import _load_backbone, _torch_setup, _train_cases
from unike.config import ConfigError, load_config, method_entry, model_settings, settings_hash
from unike.data import DataError, EditCase, edit_sample
from unike.editing import Editor, create_editor, parse_hparams, preparation, resolve_editor
from unike.grid import ONE_STEP, SEQ_10, TASKS, Layout
from unike.harness import make_sequences, pre_edit_predictions, pre_edit_tensors, run_sequences
from unike.hypernet import split_validation
from unike.method.encoders import EncoderConfig, pretrain_encoders
from unike.method.knowledge import load_triplets, save_hidden_states, save_triplets
from unike.store import atomic_write

RESULTS = Path(__file__).resolve().parent / "results" / "tuning.json"
UNFINISHED = RESULTS.with_name("tuning-unfinished.json")  # trials of searches that have not ended (TrialLog)
VALIDATION_SHARE = 0.2
TRIALS = 7  # per method: e.g. three hyperparameters with two values each beside the entry's


def search_space(config: dict, method: str, key: str = "search") -> tuple[dict, dict[str, list]]:
    """The method's start (its entry's values of the searched hyperparameters) and its
    space (per hyperparameter, the entry's value first, then the declared ones), checked
    against the editor's `Hparams` and the budget. `key`: the entry's `search` or
    `sequential_search`."""
    entry = config["methods"][method]
    if key not in entry:
        raise ConfigError(f"methods.{method} has no `{key}`: declare the values to try per hyperparameter "
                          "(docs/baselines.md, Tuning)")
    cls = resolve_editor(entry["editor"])
    known = {f.name for f in dataclasses.fields(cls.Hparams)}
    owner = f"methods.{method}.{key}"
    unknown = sorted(set(entry[key]) - known)
    if unknown:
        raise ConfigError(f"{owner}: unknown hyperparameter(s) {unknown} of {cls.__name__}; known: {sorted(known)}")
    per_backbone = sorted({h for values in entry.get("backbone_hparams", {}).values() for h in values}
                          & set(entry[key]))
    if per_backbone:
        raise ConfigError(f"{owner}: {per_backbone} also set per backbone (backbone_hparams); "
                          "the search looks for one value serving every backbone")
    both = sorted(set(entry.get("search", {})) & set(entry.get("sequential_search", {})))
    if both:
        raise ConfigError(f"methods.{method}: {both} in both `search` and `sequential_search`")
    values = dataclasses.asdict(parse_hparams(cls.Hparams, entry.get("hparams", {}), f"methods.{method}"))
    start = {h: values[h] for h in entry[key]}
    space = {h: list(dict.fromkeys([start[h], *candidates])) for h, candidates in entry[key].items()}
    # Each value with the entry's others must make valid hyperparameters: found here, not
    # when its trial comes up an hour into the search.
    for h, candidates in space.items():
        for v in candidates[1:]:
            try:
                parse_hparams(cls.Hparams, {**entry.get("hparams", {}), h: v}, owner)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{owner}.{h}: {v!r} with the entry's other values is invalid: {e}") from None
    trials = 1 + sum(len(v) - 1 for v in space.values())
    if trials != TRIALS:
        raise ConfigError(f"{owner}: {trials} trials (1 + the values other than the entry's, "
                          f"summed over hyperparameters); every method gets {TRIALS}")
    return start, space


def coordinate_search(start: dict, space: dict[str, list], evaluate: Callable[[dict], dict]
                      ) -> tuple[dict, list[dict]]:
    """One coordinate-wise pass (module docstring). `evaluate` maps searched values to a
    record with a "mean" score; returns the chosen values and every trial in the order run.
    Each trial runs once: a coordinate's first value is the one held so far, whose trial is
    the best of the previous coordinate, so a pass costs 1 + sum of (values - 1) trials.
    A tie keeps the earlier value (`max` keeps the first): the held one, then the declared order."""
    best, trials = dict(start), {}

    def trial(values: dict) -> dict:
        key = tuple(values[h] for h in space)
        if key not in trials:
            trials[key] = {"hparams": dict(values), **evaluate(values)}
        return trials[key]

    trial(best)
    for name, values in space.items():
        best[name] = max(values, key=lambda v: trial({**best, name: v})["mean"])
    return best, list(trials.values())


class TrialLog:
    """The finished trials of one search, written to `path` (tuning-unfinished.json, one
    entry per record name) as each finishes, so that a search stopped midway (killed, out of
    time, a crash) resumes where it stopped: a rerun with the same `identity` (editor, seed,
    regimes, start, space, and each backbone's settings hash) takes the logged trials
    instead of running them again, and, trials being seeded, gets what a run without the
    stop would have. `path` None keeps
    them in memory only. `forget` drops the entry once the search's record is written."""

    def __init__(self, path: Path | None, name: str, identity: dict):
        self.path, self.name = path, name
        self.identity = json.loads(json.dumps(identity))  # as the file holds it: lists, not tuples
        saved = _read_json(path).get(name)
        self.trials: list[dict] = saved["trials"] if saved and saved["identity"] == self.identity else []

    def get(self, values: dict) -> dict | None:
        """The logged trial of these searched values, if any."""
        values = json.loads(json.dumps(values))
        return next((t for t in self.trials if t["hparams"] == values), None)

    def add(self, trial: dict) -> None:
        self.trials.append(trial)
        if self.path is not None:
            _update_json(self.path, self.name, {"identity": self.identity, "trials": self.trials})

    @staticmethod
    def forget(path: Path, name: str) -> None:
        _update_json(path, name, None)


def _read_json(path: Path | None) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}


def _update_json(path: Path, name: str, entry: dict | None) -> None:
    """Entry `name` of the JSON file `path` set to `entry` (None: removed; a file left empty
    is removed), the other entries kept. Two searches may run at once (one per core, other
    methods): the read and the write happen under an exclusive lock on a file beside
    `path`, and the write replaces the file whole, so neither loses the other's entries and
    no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = _read_json(path)
        entries.pop(name, None)
        if entry is not None:
            entries[name] = entry
        if entries:
            text = json.dumps(entries, indent=2, sort_keys=True) + "\n"
            atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        else:
            path.unlink(missing_ok=True)


def split_by_fact(cases: list[EditCase], share: float, seed: int) -> tuple[list[EditCase], list[EditCase]]:
    """(fit, validation): the rule trained editors' `prepare` holds out by (whole facts,
    seeded, at least `share` of the cases), refused where it cannot hold any fact out."""
    fit, validation = split_validation(cases, share, seed)
    if not validation:
        raise ConfigError(f"{len({c.fact_id for c in cases})} fact(s) in {len(cases)} train cases: "
                          "too few to hold any out")
    return fit, validation


def knowledge_without(source: Path, target: Path, validation: list[EditCase], enc_cfg: EncoderConfig) -> int:
    """A copy of the knowledge folder without the triplets of the validation edit inputs
    (triplets are the train split's edit inputs the backbone gets wrong), its encoders and
    zeta retrained on the rest; returns how many triplets were removed."""
    held = {(str(edit_sample(c).image), edit_sample(c).prompt) for c in validation}
    triplets = load_triplets(source / "triplets.json")
    keep = [i for i, t in enumerate(triplets) if (t.image, t.prompt) not in held]
    with safe_open(str(source / "hidden_states.safetensors"), "pt") as f:
        layers = json.loads(f.metadata()["layers"])
        states = {k: f.get_tensor(k)[keep].contiguous() for k in f.keys()}
    target.mkdir(parents=True)
    save_triplets(target / "triplets.json", [triplets[i] for i in keep])
    save_hidden_states(target / "hidden_states.safetensors", states, layers)
    pretrain_encoders(target, enc_cfg)
    return len(triplets) - len(keep)


def task_scores(rows: list[dict]) -> dict[str, float]:
    n = len(rows)
    rel = sum(r["rel"] for r in rows) / n
    gen = sum(r["t_gen"] + r["m_gen"] for r in rows) / (2 * n)
    loc = sum(r["t_loc"] + r["m_loc"] for r in rows) / (2 * n)
    return {"rel": rel, "gen": gen, "loc": loc, "mean": (rel + gen + loc) / 3}


@dataclasses.dataclass
class ValidationSplit:
    """One backbone with each task's train cases divided: methods learn from `fit` and are
    scored on `validation`. Prepared folders (per task and preparation, `editing.preparation`)
    and the rebuilt knowledge folder are made under `root` when a trial first needs them."""

    backbone: Backbone
    fit: dict[str, list[EditCase]]
    validation: dict[str, list[EditCase]]
    root: Path
    seed: int
    knowledge_source: Path | None = None  # the run's knowledge folder, built from the whole train split
    encoders: EncoderConfig | None = None  # how the run trained the knowledge folder's encoders
    backbone_settings: str | None = None  # the hash of what decides the backbone: world, pretraining, data
    triplets_removed: int | None = None  # once the knowledge is rebuilt
    prepared: dict[tuple, Path] = dataclasses.field(default_factory=dict)
    pre_edit: dict[str, dict] = dataclasses.field(init=False)

    def __post_init__(self):
        self.pre_edit = {t: pre_edit_tensors(pre_edit_predictions(self.backbone, cases), cases)
                         for t, cases in self.validation.items()}

    def knowledge(self) -> Path:
        """The knowledge folder without the validation cases, rebuilt on first use."""
        target = self.root / "knowledge"
        if self.triplets_removed is None:
            if self.knowledge_source is None or not (self.knowledge_source / "encoders.safetensors").is_file():
                raise ConfigError(f"no knowledge folder at {self.knowledge_source}: run the DAG first "
                                  "(snakemake --cores 2)")
            held = [c for cases in self.validation.values() for c in cases]
            self.triplets_removed = knowledge_without(self.knowledge_source, target, held, self.encoders)
        return target

    def editor(self, entry: dict, task: str, owner: str) -> Editor:
        """`entry`'s editor for `task`'s validation cases, prepared on that task's fit cases."""
        cls = resolve_editor(entry["editor"])
        knowledge = self.knowledge() if cls.needs_knowledge else None
        prepared = None
        if cls.needs_training:
            key = (task, *preparation(entry, owner))
            prepared = self.prepared.get(key)
            if prepared is None:
                prepared = self.prepared[key] = self.root / "prepared" / str(len(self.prepared))
                prepared.mkdir(parents=True)
                torch.manual_seed(self.seed)
                extra = {"knowledge": knowledge} if cls.needs_knowledge else {}
                cls.prepare(self.backbone, parse_hparams(cls.Hparams, entry["hparams"], owner), self.fit[task],
                            prepared, self.seed, **extra)
        torch.manual_seed(self.seed)
        return create_editor(entry, self.backbone, prepared, knowledge)

    def score(self, entry: dict, owner: str, regime: str = ONE_STEP.name) -> dict:
        """Editing of the validation cases in `regime` (one-step: each case alone): scores
        per task, and their mean."""
        out = {}
        for task, cases in self.validation.items():
            sequences = make_sequences({task: cases}, regime, self.seed)
            if not sequences:
                raise DataError(f"{task}: {len(cases)} validation cases make no {regime} sequence")
            editor = self.editor(entry, task, owner)
            try:
                rows = run_sequences(editor, sequences,
                                     self.pre_edit[task], progress_every=len(cases))
            finally:
                editor.close()
            out[task] = task_scores(rows)
        out["mean"] = sum(out[t]["mean"] for t in self.validation) / len(self.validation)
        return out

    def summary(self) -> dict:
        return {"tasks": {task: {"validation_cases": len(self.validation[task]), "fit_cases": len(self.fit[task]),
                                 "validation_facts": len({c.fact_id for c in self.validation[task]})}
                          for task in self.fit}}


def validation_split(config: dict, layout: Layout, name: str, root: Path) -> ValidationSplit:
    """Backbone `name` of a finished run, with the validation split of its mined train cases."""
    if not layout.backbone_dir(name).is_dir() or not layout.annotations(name).is_dir():
        raise ConfigError(f"{name}: no backbone or mined data under {layout.out}: run the DAG first "
                          "(snakemake --cores 2)")
    fit, validation = {}, {}
    for task in TASKS:
        fit[task], validation[task] = split_by_fact(_train_cases(config, layout, name, task), VALIDATION_SHARE,
                                                    config["seed"])
    return ValidationSplit(_load_backbone(config, layout, name), fit, validation, root, config["seed"],
                           layout.knowledge(name),
                           EncoderConfig(**{"seed": config["seed"], **config.get("knowledge", {}).get("encoders", {})}),
                           settings_hash(model_settings(config, name)))


def tune(config: dict, method: str, splits: dict[str, ValidationSplit], sequential: bool = False,
         unfinished: Path | None = None) -> dict:
    """The search of one method over the backbones of `splits`: its record in tuning.json
    (`sequential`: its `sequential_search`, scored on one-step and seq-10 alike). Trials
    finished by an earlier, stopped run of the same search are taken from `unfinished`, and
    each new one is added there (None: neither)."""
    start, space = search_space(config, method, "sequential_search" if sequential else "search")
    regimes = [ONE_STEP.name, SEQ_10.name] if sequential else [ONE_STEP.name]
    owner, t0 = f"methods.{method}", time.time()
    editor = config["methods"][method]["editor"]
    # A backbone by the hash of what decides it (world, pretraining, data): trials scored on
    # other backbones (another world, another schedule) are never resumed from.
    backbone_hashes = {n: splits[n].backbone_settings for n in sorted(splits)}
    log = TrialLog(unfinished, record_name(method, sequential),
                   {"editor": editor, "seed": config["seed"], "regimes": regimes, "validation_share": VALIDATION_SHARE,
                    "start": start, "search": space, "backbones": backbone_hashes})
    if log.trials:
        print(f"{method}: {len(log.trials)} trial(s) finished by an earlier run of this search are taken from "
              f"{unfinished}", flush=True)

    def backbone_scores(split: ValidationSplit, entry: dict) -> dict:
        if not sequential:
            return split.score(entry, owner)
        # A stability measure acts on a single edit too (it caps it): the mean of both regimes.
        per_regime = {regime: split.score(entry, owner, regime) for regime in regimes}
        return {**per_regime, "mean": sum(s["mean"] for s in per_regime.values()) / len(per_regime)}

    def evaluate(values: dict) -> dict:
        logged = log.get(values)
        if logged is not None:
            return {k: v for k, v in logged.items() if k != "hparams"}
        t = time.time()
        scores = {}
        for name, split in splits.items():
            entry = method_entry(config, method, name)
            scores[name] = backbone_scores(split, {**entry, "hparams": {**entry["hparams"], **values}})
        mean = sum(s["mean"] for s in scores.values()) / len(scores)
        print(method, values, round(100 * mean, 1), {n: round(100 * s["mean"], 1) for n, s in scores.items()},
              flush=True)
        result = {"backbones": scores, "mean": mean, "seconds": round(time.time() - t, 1)}
        log.add({"hparams": dict(values), **result})
        return result

    resumed = sum(t["seconds"] for t in log.trials)
    chosen, trials = coordinate_search(start, space, evaluate)
    rebuilt = resolve_editor(editor).needs_knowledge
    return {"editor": editor, "seed": config["seed"], "regimes": regimes,
            "validation_share": VALIDATION_SHARE, "start": start, "search": space, "chosen": chosen,
            "trials": trials, "seconds": round(time.time() - t0 + resumed, 1),
            "backbones": {n: {**s.summary(), "settings": s.backbone_settings,
                              **({"triplets_removed": s.triplets_removed} if rebuilt else {})}
                          for n, s in splits.items()}}


def record_name(method: str, sequential: bool) -> str:
    """A search's key in tuning.json: the method, or `<method>, seq-10` for its sequential search."""
    return f"{method}, {SEQ_10.name}" if sequential else method


def advice(method: str, record: dict) -> str:
    """What to change in config.yaml for the chosen values."""
    start, chosen = (next(t for t in record["trials"] if t["hparams"] == record[k]) for k in ("start", "chosen"))
    head = f"{method}: validation mean {100 * start['mean']:.1f} (start) -> {100 * chosen['mean']:.1f} (chosen)"
    changes = [f"  methods.{method}.hparams.{h}: {record['start'][h]!r} -> {v!r}"
               for h, v in record["chosen"].items() if v != record["start"][h]]
    return "\n".join([head, *changes] if changes else [head, f"  methods.{method}.hparams: keep (the start is best)"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--method", action="append", required=True, help="a config entry with `search` (repeatable)")
    parser.add_argument("--backbones", nargs="+", help="default: every backbone of the config")
    parser.add_argument("--sequential", action="store_true",
                        help="search the entries' `sequential_search`, scored on seq-10 (module docstring)")
    args = parser.parse_args()
    key = "sequential_search" if args.sequential else "search"
    try:
        config = load_config(args.config)
        for kind, names, known in (("method", args.method, config["methods"]),
                                   ("backbone", args.backbones or [], config["backbones"])):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ConfigError(f"unknown {kind}(s) {unknown}; defined: {sorted(known)}")
        for method in args.method:
            search_space(config, method, key)  # every refusal before any model loads
        layout = Layout(config)
        _torch_setup(config)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        with tempfile.TemporaryDirectory() as tmp:
            splits = {name: validation_split(config, layout, name, Path(tmp) / name)
                      for name in args.backbones or config["backbones"]}
            for method in args.method:  # each record as its search ends: a later one may yet stop
                name = record_name(method, args.sequential)
                record = tune(config, method, splits, args.sequential, UNFINISHED)
                _update_json(RESULTS, name, record)
                TrialLog.forget(UNFINISHED, name)
                print(advice(method, record), flush=True)
    except (ConfigError, DataError) as e:  # bad input: one line naming it, no traceback
        raise SystemExit(f"tune.py: error: {e}") from None


if __name__ == "__main__":
    main()
