import functools
import re
import shlex
import sys
from pathlib import Path

import yaml

from unike import config as settings
from unike.resources import JobSizer, load_measurements, retry_growth
from unike.grid import CROSS_TASK, REGIMES, RUN_TASKS, SPLIT_FILES, Cell, Layout, case_tasks

OUT = config["out_dir"]
THREADS = config["threads"]
ON_GPU = config["device"].startswith("cuda")
BACKBONES = sorted(config["backbones"])

# Every seed runs its own chain (world to runs) through the same rules, reading that
# seed's config (unike.config.seed_config): the paths of every rule but aggregate and
# report start with the {seed_dir} wildcard, "" for `seed` and "seed<n>/" for each of
# `extra_seeds` (unike.grid.Layout).
CHAINS = {LAYOUT.seed_prefix(seed): settings.seed_config(config, seed) for seed in settings.seeds(config)}
CHAIN_LAYOUTS = {seed_dir: Layout(seeded) for seed_dir, seeded in CHAINS.items()}


def chain_config(wildcards):
    """The config of the job's seed: what its settings hash reads."""
    return CHAINS[wildcards.seed_dir]


def chain_layout(wildcards):
    """The layout of the job's seed: where its inputs lie."""
    return CHAIN_LAYOUTS[wildcards.seed_dir]


def _alternatives(names):
    return "|".join(re.escape(n) for n in names)


wildcard_constraints:
    seed_dir=f"(?:{_alternatives(CHAINS)})",  # grouped: an empty constraint would mean Snakemake's default .+
    backbone=_alternatives(BACKBONES),
    method=_alternatives(sorted(config["methods"])),
    task=_alternatives(RUN_TASKS),
    regime=_alternatives(REGIMES),
    seed=r"\d+",


def out(pattern, *parts):
    """An output path pattern of unike.grid.Layout in a seed's chain (wildcards left in)."""
    return LAYOUT.pattern(pattern, *parts)


def log_file(rule, *parts):
    """The log of a job of a seed's chain."""
    return LAYOUT.pattern(Layout.LOG_PATTERN.format(rule=rule), *parts)


def top_log(rule):
    """The log of a job over every seed (aggregate, report), under out_dir itself."""
    return str(LAYOUT.out / Layout.LOG_PATTERN.format(rule=rule)) + ".log"


# The steps read the exact config Snakemake validated (merged --configfile/--config), as
# their seed's chain runs it, written into the chain's folder once per content change so
# its timestamp does not trigger reruns.
EFFECTIVE_CONFIG = "config.effective.yaml"
for _chain in CHAINS.values():
    _path = Path(_chain["out_dir"]) / EFFECTIVE_CONFIG
    _text = yaml.safe_dump(_chain, sort_keys=False)  # method order decides prepared-folder owners
    if not _path.exists() or _path.read_text(encoding="utf-8") != _text:
        _path.parent.mkdir(parents=True, exist_ok=True)
        _path.write_text(_text, encoding="utf-8")

# Jobs run the interpreter that runs Snakemake (a job's PATH may not hold the venv's
# `python`). The command text names {PYTHON}, {OUT_DIR} and {CONFIG_FILE}, which Snakemake
# fills in when it runs the job: its code-change trigger compares the text, so another
# venv or out_dir does not count as changed code. Every path is shell-quoted.
PYTHON = shlex.quote(sys.executable)
OUT_DIR = shlex.quote(OUT)
CONFIG_FILE = shlex.quote(str(Path(OUT) / EFFECTIVE_CONFIG))  # aggregate's and report's: every seed's runs


def unike(step, *options):
    """The shell command of a step of a seed's chain, with the chain's config:
    `python -m unike STEP --config ... --OPTION {wildcards.OPTION:q} ...`."""
    flags = "".join(f" --{o} {{wildcards.{o}:q}}" for o in options)
    return (f"{{PYTHON}} -m unike {step} --config {{OUT_DIR}}/{{wildcards.seed_dir}}{EFFECTIVE_CONFIG}{flags}"
            " > {log:q} 2>&1")


def external_input(path):
    """A file from outside the DAG (real weights, MMEdit): an input once it exists, so a
    dry run works without it; a real run checks every such path first (onstart)."""
    return [str(path)] if Path(path).exists() else []


def annotation_files(wildcards, tasks, split):
    """The MMEdit split files of `tasks` for the job's backbone: mined by the DAG in the
    job's seed's chain (tiny world) or given (mmedit)."""
    paths = [chain_layout(wildcards).annotations(wildcards.backbone) / SPLIT_FILES[(t, split)] for t in tasks]
    if config["data"]["source"] == "mmedit":
        return [f for p in paths for f in external_input(p)]
    return [str(p) for p in paths]


@functools.cache
def editor_flag(method, flag):
    """A capability flag of the method's editor class (imports its module once)."""
    from unike.editing import resolve_editor

    return getattr(resolve_editor(config["methods"][method]["editor"]), flag)


@functools.cache
def prepare_owners(backbone):
    """Method -> the method whose prepared folder it uses on `backbone` (variants share one)."""
    from unike.editing import prepare_owners

    return prepare_owners(settings.methods_for(config, backbone))


# ---------------------------------------------------------------- job resources
# Each rule's host memory, time and GPU memory come from the config (unike.resources:
# the backbone's size and dtype, the cases a job goes through, a per-method cost, the GPU
# measurements in benchmarks/results/gpu_resources.json when they exist); a retry doubles
# memory and time (Snakemake passes `attempt`).
SIZER = JobSizer(config, load_measurements())


def memory(rule):
    return lambda wildcards, attempt: retry_growth(SIZER.mem_mb(rule, wildcards.get("backbone")), attempt)


def time_limit(rule):
    def minutes(wildcards, attempt):
        w = wildcards.get
        return retry_growth(SIZER.runtime(rule, w("backbone"), w("task"), w("method"), w("regime")), attempt)

    return minutes


def gpu_memory(rule):
    """GPU memory in GB (resource gpu_mem_gb): what the job needs, not a card; unset on the CPU."""
    def gb(wildcards):
        if not ON_GPU:
            return None
        method = wildcards.get("method")
        return SIZER.gpu_mem_gb(rule, wildcards.backbone, method,
                                method is not None and editor_flag(method, "needs_knowledge"))

    return gb


def profile_default(name):
    """A constant the profile sets under default-resources (None when unset or without a
    profile). Snakemake evaluates a resource only per job and from its own inputs, never
    from another resource, so the workflow reads the profile's large-GPU settings here."""
    defaults = workflow.resource_settings.default_resources
    raw = defaults.get(name).raw if defaults is not None and defaults.get(name) is not None else None
    if isinstance(raw, str) and len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\"":
        raw = raw[1:-1]  # a profile quotes strings so that Snakemake does not evaluate them
    return raw


def large_gpu(rule, resource):
    """The profile's `gpu_large_<resource>` (constraint, gpu_model) for a job whose
    gpu_mem_gb exceeds the profile's `gpu_large_above_gb`, else the profile's default for
    `resource`; None (not passed to Slurm) when neither is set."""
    above, large, default = (profile_default(n) for n in ("gpu_large_above_gb", f"gpu_large_{resource}", resource))
    need = gpu_memory(rule)

    def value(wildcards):
        gb = need(wildcards)
        if above is not None and large is not None and gb is not None and gb > int(above):
            return large
        return default

    return value


def knowledge_files(wildcards):
    """UniKE's per-backbone knowledge, for editors that need it."""
    if not editor_flag(wildcards.method, "needs_knowledge"):
        return []
    folder = chain_layout(wildcards).knowledge(wildcards.backbone)
    return [str(folder / "hidden_states.safetensors"), str(folder / "encoders.safetensors")]
