"""The experiment grid's vocabulary: tasks, regimes, grid cells and where every artifact
lives. The one owner of these names: the Snakemake rules, the CLI, the harness, the store
and the reports read them from here instead of writing literals.

Free of torch and of every other `unike` module, so the workflow, the data contract and
the reports can import it at no cost and without cycles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------- tasks
E_VQA = "e-vqa"
E_IC = "e-ic"
TASKS = (E_VQA, E_IC)  # the task of an edit case (MMEdit's two datasets)
CROSS_TASK = "cross-task"  # a run's task may also be this: E-VQA and E-IC cases mixed in one sequence
RUN_TASKS = (*TASKS, CROSS_TASK)


def case_tasks(run_task: str) -> tuple[str, ...]:
    """The case tasks a run of `run_task` edits: both for cross-task, else the task itself."""
    if run_task == CROSS_TASK:
        return TASKS
    if run_task not in TASKS:
        raise ValueError(f"unknown task {run_task!r}; known: {list(RUN_TASKS)}")
    return (run_task,)


# ---------------------------------------------------------------- regimes
@dataclass(frozen=True)
class Regime:
    name: str
    length: int  # edits applied before the sequence is scored (paper Appendix B.2)
    mixes_tasks: bool  # a sequence holds length/2 cases of each task (cross-task editing)


ONE_STEP = Regime("one-step", 1, False)
SEQ_10 = Regime("seq-10", 10, False)
SEQ_20 = Regime("seq-20", 20, False)
CROSS_10 = Regime("cross-10", 10, True)
REGIMES = {r.name: r for r in (ONE_STEP, SEQ_10, SEQ_20, CROSS_10)}
SEQUENTIAL_REGIMES = tuple(r.name for r in REGIMES.values() if r.length > 1 and not r.mixes_tasks)


def regime(name: str) -> Regime:
    try:
        return REGIMES[name]
    except KeyError:
        raise ValueError(f"unknown regime {name!r}; known: {list(REGIMES)}") from None


def regimes_for_task(run_task: str) -> tuple[str, ...]:
    """The regimes a run of `run_task` can take: task-mixing regimes only for cross-task."""
    mixed = run_task == CROSS_TASK
    return tuple(r.name for r in REGIMES.values() if r.mixes_tasks == mixed)


# ---------------------------------------------------------------- data files
SPLITS = ("train", "eval")
SPLIT_FILES = {(E_VQA, "train"): "vqa_train.json", (E_VQA, "eval"): "vqa_eval.json",
               (E_IC, "train"): "caption_train_edit.json", (E_IC, "eval"): "caption_eval_edit.json"}


# ---------------------------------------------------------------- grid cells
@dataclass(frozen=True, order=True)
class Cell:
    """One grid cell: a method edits a backbone on a task in a regime (one edit_eval job)."""

    method: str
    backbone: str
    task: str
    regime: str


# ---------------------------------------------------------------- output layout
class Layout:
    """Where each artifact lives under `out_dir`. The workflow's rules take their output
    patterns from the `*_PATTERN` strings (Snakemake wildcards in braces); the steps take
    concrete paths from the methods, which fill in the same patterns.

    Each seed has its own chain, world to runs: the config's `seed` directly under
    `out_dir` (a single-seed run's paths do not change when seeds are added), each of its
    `extra_seeds` under `out_dir/seed<n>/` (`seed_prefix`), laid out the same way: the
    chain of an extra seed is a single-seed run into that folder (`unike.config.seed_config`).
    The DB and the report, over every seed's runs, lie directly under `out_dir`."""

    SEED_PATTERN = "seed{seed}/"
    WORLD = "world"
    BACKBONE_PATTERN = "backbones/{backbone}"
    DATA_PATTERN = "data/{backbone}"
    PRE_EDIT_PATTERN = "pre_edit/{backbone}/{task}.json"
    PRE_EDIT_STREAMS_PATTERN = "pre_edit/{backbone}/{task}.streams.safetensors"
    PREPARED_PATTERN = "editors/{method}/{backbone}/{task}"
    KNOWLEDGE_PATTERN = "knowledge/{backbone}"
    RUN_PATTERN = "runs/{method}/{backbone}/{task}/{regime}/seed{seed}"
    LOG_PATTERN = "logs/{rule}"
    DB = "metrics.duckdb"
    REPORT = "report"

    def __init__(self, config: dict):
        self.config = config
        self.out = Path(config["out_dir"])

    def pattern(self, pattern: str, *parts: str) -> str:
        """`pattern` in a seed's chain with its wildcards left in, for a rule's input/output;
        it starts with the {seed_dir} wildcard, the chain's `seed_prefix`."""
        return str(self.out.joinpath("{seed_dir}" + pattern, *parts))

    def seed_prefix(self, seed: int) -> str:
        """Where `seed`'s chain lies under out_dir, as a path prefix: "" for the config's
        `seed`, `seed<n>/` for each of its `extra_seeds`."""
        return "" if seed == self.config["seed"] else self.SEED_PATTERN.format(seed=seed)

    @property
    def world(self) -> Path:
        return self.out / self.WORLD

    def backbone_dir(self, backbone: str) -> Path:
        b = self.config["backbones"][backbone]
        return Path(b["path"]) if b["source"] == "local" else self.out / self.BACKBONE_PATTERN.format(backbone=backbone)

    def annotations(self, backbone: str) -> Path:
        data = self.config["data"]
        return Path(data["annotations"]) if data["source"] == "mmedit" else self.out / self.DATA_PATTERN.format(
            backbone=backbone)

    @property
    def image_root(self) -> Path:
        data = self.config["data"]
        return Path(data["image_root"]) if data["source"] == "mmedit" else self.world

    def pre_edit(self, backbone: str, task: str) -> Path:
        return self.out / self.PRE_EDIT_PATTERN.format(backbone=backbone, task=task)

    def pre_edit_streams(self, backbone: str, task: str) -> Path:
        """The scored inputs' residual streams at UniKE's first edited layer (`unike.harness`)."""
        return self.out / self.PRE_EDIT_STREAMS_PATTERN.format(backbone=backbone, task=task)

    def prepared(self, method: str, backbone: str, task: str) -> Path:
        """Folder of what a trained method prepared once per backbone and task."""
        return self.out / self.PREPARED_PATTERN.format(method=method, backbone=backbone, task=task)

    def knowledge(self, backbone: str) -> Path:
        """UniKE's per-backbone triplets, hidden states and encoders."""
        return self.out / self.KNOWLEDGE_PATTERN.format(backbone=backbone)

    def run_stem(self, cell: Cell) -> Path:
        return self.out / self.RUN_PATTERN.format(**cell.__dict__, seed=self.config["seed"])

    @property
    def db(self) -> Path:
        return self.out / self.DB

    @property
    def report(self) -> Path:
        return self.out / self.REPORT
