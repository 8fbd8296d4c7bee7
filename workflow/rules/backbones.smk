# Tiny backbones are pretrained on the old world, or installed from released/ where a release has
# their exact key (unike/releases.py); their real mistakes become the edit cases.
# Real backbones come prepared from local paths (config backbones.<name>.path).


rule pretrain_backbone:
    input:
        out(Layout.WORLD, "pretrain.json"),
        out(Layout.WORLD, "pretrain_eval.json"),
    output:
        out(Layout.BACKBONE_PATTERN, "training.json"),
        out(Layout.BACKBONE_PATTERN, "unike_backbone.json"),
    params:
        settings=lambda wc: settings.settings_hash(settings.pretrain_settings(chain_config(wc), wc.backbone)),
    log:
        log_file("pretrain_backbone", "{backbone}.log"),
    threads: THREADS
    resources:
        mem_mb=memory("pretrain_backbone"),
        runtime=time_limit("pretrain_backbone"),
    shell:
        unike("pretrain-backbone", "backbone")


def backbone_ready(wildcards):
    """The file that proves a backbone directory is usable: the pretraining output of a
    tiny backbone; the config.json of a local one (given, not built: see external_input)."""
    path = chain_layout(wildcards).backbone_dir(wildcards.backbone)
    if config["backbones"][wildcards.backbone]["source"] == "local":
        return external_input(path / "config.json")
    return str(path / "unike_backbone.json")


rule mine_edits:
    input:
        backbone=backbone_ready,
        world=[out(Layout.WORLD, name) for name in WORLD_FILES],
    output:
        out(Layout.DATA_PATTERN, "mining.json"),
        [out(Layout.DATA_PATTERN, name) for name in sorted(set(SPLIT_FILES.values()))],
    params:
        settings=lambda wc: settings.settings_hash(settings.model_settings(chain_config(wc), wc.backbone)),
    log:
        log_file("mine_edits", "{backbone}.log"),
    threads: THREADS
    resources:
        mem_mb=memory("mine_edits"),
        runtime=time_limit("mine_edits"),
        gpu=1 if ON_GPU else 0,
        gpu_mem_gb=gpu_memory("mine_edits"),
        constraint=large_gpu("mine_edits", "constraint"),
        gpu_model=large_gpu("mine_edits", "gpu_model"),
    shell:
        unike("mine-edits", "backbone")
