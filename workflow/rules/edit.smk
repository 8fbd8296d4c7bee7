# Pre-edit predictions once per (backbone, task); then one edit_eval job per grid cell.


rule cache_pre_edit:
    input:
        backbone=backbone_ready,
        split=lambda wc: annotation_files(wc.backbone, [wc.task], "eval"),
    output:
        out(Layout.PRE_EDIT_PATTERN),
    params:
        settings=lambda wc: settings.settings_hash(settings.eval_settings(config, wc.backbone, wc.task)),
    log:
        log_file("cache_pre_edit", "{backbone}", "{task}.log"),
    threads: THREADS
    resources:
        mem_mb=memory(3000),
        runtime=30,
        gpu=1 if ON_GPU else 0,
    shell:
        unike("cache-pre-edit", "backbone", "task")


def pre_edit_files(wildcards):
    return [str(LAYOUT.pre_edit(wildcards.backbone, t)) for t in case_tasks(wildcards.task)]


rule prepare_editor:
    input:
        backbone=backbone_ready,
        splits=lambda wc: annotation_files(wc.backbone, case_tasks(wc.task), "train"),
        knowledge=knowledge_files,
    output:
        out(Layout.PREPARED_PATTERN, "prepared.json"),
    params:
        settings=lambda wc: settings.settings_hash(
            settings.prepare_settings(config, wc.method, wc.backbone, wc.task)),
    log:
        log_file("prepare_editor", "{method}", "{backbone}", "{task}.log"),
    threads: THREADS
    resources:
        mem_mb=memory(6000),
        runtime=240,
        gpu=1 if ON_GPU else 0,
    shell:
        unike("prepare-editor", "method", "backbone", "task")


def prepared_editor(wildcards):
    if not editor_flag(wildcards.method, "needs_training"):
        return []
    owner = prepare_owners(wildcards.backbone)[wildcards.method]
    return [str(LAYOUT.prepared(owner, wildcards.backbone, wildcards.task) / "prepared.json")]


rule edit_eval:
    input:
        backbone=backbone_ready,
        pre_edit=pre_edit_files,
        splits=lambda wc: annotation_files(wc.backbone, case_tasks(wc.task), "eval"),
        prepared=prepared_editor,
        knowledge=knowledge_files,
    output:
        parquet=out(Layout.RUN_PATTERN + ".parquet"),
        provenance=out(Layout.RUN_PATTERN + ".json"),
    params:
        settings=lambda wc: settings.cell_config_hash(config, Cell(wc.method, wc.backbone, wc.task, wc.regime)),
    log:
        log_file("edit_eval", Layout.RUN_PATTERN + ".log"),
    threads: THREADS
    resources:
        mem_mb=memory(4000),
        runtime=120,
        gpu=1 if ON_GPU else 0,
    shell:
        unike("edit-eval", "method", "backbone", "task", "regime")


RUN_FILES = [str(LAYOUT.run_stem(c).with_suffix(".parquet")) for c in CELLS]
