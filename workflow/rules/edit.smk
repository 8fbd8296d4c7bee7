# Pre-edit predictions once per (backbone, task); then one edit_eval job per grid cell.

from unike.config import SPLIT_FILES


def eval_split(wildcards):
    return annotation_files(wildcards.backbone, [wildcards.task], "eval")


rule cache_pre_edit:
    input:
        backbone=backbone_ready,
        split=eval_split,
    output:
        f"{OUT}/pre_edit/{{backbone}}/{{task}}.json",
    log:
        f"{OUT}/logs/cache_pre_edit/{{backbone}}/{{task}}.log",
    threads: THREADS
    resources:
        mem_mb=3000,
        runtime=30,
        gpu=1 if ON_GPU else 0,
    shell:
        unike("cache-pre-edit") + " --backbone {wildcards.backbone} --task {wildcards.task} > {log} 2>&1"


def _tasks(wildcards):
    return ["e-vqa", "e-ic"] if wildcards.task == "cross-task" else [wildcards.task]


def pre_edit_files(wildcards):
    return [f"{OUT}/pre_edit/{wildcards.backbone}/{t}.json" for t in _tasks(wildcards)]


def eval_splits(wildcards):
    return annotation_files(wildcards.backbone, _tasks(wildcards), "eval")


def train_splits(wildcards):
    return annotation_files(wildcards.backbone, _tasks(wildcards), "train")


rule prepare_editor:
    input:
        backbone=backbone_ready,
        splits=train_splits,
        knowledge=knowledge_files,
    output:
        f"{OUT}/editors/{{method}}/{{backbone}}/{{task}}/prepared.json",
    log:
        f"{OUT}/logs/prepare_editor/{{method}}/{{backbone}}/{{task}}.log",
    threads: THREADS
    resources:
        mem_mb=6000,
        runtime=240,
        gpu=1 if ON_GPU else 0,
    shell:
        unike("prepare-editor")
        + " --method {wildcards.method} --backbone {wildcards.backbone} --task {wildcards.task} > {log} 2>&1"


def prepared_editor(wildcards):
    if not editor_flag(wildcards.method, "needs_training"):
        return []
    owner = prepare_owners(wildcards.backbone)[wildcards.method]
    return [str(LAYOUT.prepared(owner, wildcards.backbone, wildcards.task) / "prepared.json")]


rule edit_eval:
    input:
        backbone=backbone_ready,
        pre_edit=pre_edit_files,
        splits=eval_splits,
        prepared=prepared_editor,
        knowledge=knowledge_files,
    output:
        parquet=f"{OUT}/runs/{{method}}/{{backbone}}/{{task}}/{{regime}}/seed{{seed}}.parquet",
        provenance=f"{OUT}/runs/{{method}}/{{backbone}}/{{task}}/{{regime}}/seed{{seed}}.json",
    log:
        f"{OUT}/logs/edit_eval/{{method}}/{{backbone}}/{{task}}/{{regime}}/seed{{seed}}.log",
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=1 if ON_GPU else 0,
    shell:
        unike("edit-eval")
        + " --method {wildcards.method} --backbone {wildcards.backbone}"
        + " --task {wildcards.task} --regime {wildcards.regime} > {log} 2>&1"


RUN_FILES = [str(LAYOUT.run_stem(c).with_suffix(".parquet")) for c in CELLS]
