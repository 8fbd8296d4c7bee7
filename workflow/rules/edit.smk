# Pre-edit predictions (and the scored inputs' streams at UniKE's first edited layer) once
# per (backbone, task); then one edit_eval job per grid cell.


rule cache_pre_edit:
    input:
        backbone=backbone_ready,
        split=lambda wc: annotation_files(wc, [wc.task], "eval"),
    output:
        out(Layout.PRE_EDIT_PATTERN),
        out(Layout.PRE_EDIT_STREAMS_PATTERN),
    params:
        settings=lambda wc: settings.settings_hash(settings.pre_edit_settings(chain_config(wc), wc.backbone, wc.task)),
    log:
        log_file("cache_pre_edit", "{backbone}", "{task}.log"),
    threads: THREADS
    resources:
        mem_mb=memory("cache_pre_edit"),
        runtime=time_limit("cache_pre_edit"),
        gpu=1 if ON_GPU else 0,
        gpu_mem_gb=gpu_memory("cache_pre_edit"),
        constraint=large_gpu("cache_pre_edit", "constraint"),
        gpu_model=large_gpu("cache_pre_edit", "gpu_model"),
    shell:
        unike("cache-pre-edit", "backbone", "task")


def pre_edit_files(wildcards):
    layout = chain_layout(wildcards)
    return [str(path) for t in case_tasks(wildcards.task)
            for path in (layout.pre_edit(wildcards.backbone, t), layout.pre_edit_streams(wildcards.backbone, t))]


rule prepare_editor:
    input:
        backbone=backbone_ready,
        splits=lambda wc: annotation_files(wc, case_tasks(wc.task), "train"),
        knowledge=knowledge_files,
    output:
        out(Layout.PREPARED_PATTERN, "prepared.json"),
    params:
        settings=lambda wc: settings.settings_hash(
            settings.prepare_settings(chain_config(wc), wc.method, wc.backbone, wc.task)),
    log:
        log_file("prepare_editor", "{method}", "{backbone}", "{task}.log"),
    threads: THREADS
    resources:
        mem_mb=memory("prepare_editor"),
        runtime=time_limit("prepare_editor"),
        gpu=1 if ON_GPU else 0,
        gpu_mem_gb=gpu_memory("prepare_editor"),
        constraint=large_gpu("prepare_editor", "constraint"),
        gpu_model=large_gpu("prepare_editor", "gpu_model"),
    shell:
        unike("prepare-editor", "method", "backbone", "task")


def prepared_editor(wildcards):
    if not editor_flag(wildcards.method, "needs_training"):
        return []
    owner = prepare_owners(wildcards.backbone)[wildcards.method]
    return [str(chain_layout(wildcards).prepared(owner, wildcards.backbone, wildcards.task) / "prepared.json")]


rule edit_eval:
    input:
        backbone=backbone_ready,
        pre_edit=pre_edit_files,
        splits=lambda wc: annotation_files(wc, case_tasks(wc.task), "eval"),
        prepared=prepared_editor,
        knowledge=knowledge_files,
    output:
        parquet=out(Layout.RUN_PATTERN + ".parquet"),
        provenance=out(Layout.RUN_PATTERN + ".json"),
    params:
        settings=lambda wc: settings.cell_config_hash(chain_config(wc),
                                                      Cell(wc.method, wc.backbone, wc.task, wc.regime)),
    log:
        log_file("edit_eval", "{method}", "{backbone}", "{task}", "{regime}", "seed{seed}.log"),
    threads: THREADS
    resources:
        mem_mb=memory("edit_eval"),
        runtime=time_limit("edit_eval"),
        gpu=1 if ON_GPU else 0,
        gpu_mem_gb=gpu_memory("edit_eval"),
        constraint=large_gpu("edit_eval", "constraint"),
        gpu_model=large_gpu("edit_eval", "gpu_model"),
    shell:
        unike("edit-eval", "method", "backbone", "task", "regime")


# Every seed's runs: aggregate puts them all into the one DB.
RUN_FILES = [str(layout.run_stem(c).with_suffix(".parquet")) for layout in CHAIN_LAYOUTS.values() for c in CELLS]
