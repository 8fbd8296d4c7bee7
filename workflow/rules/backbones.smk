# Tiny backbones are pretrained on the old world; their real mistakes become the edit cases.
# Real backbones come prepared from local paths (config backbones.<name>.path).


rule pretrain_backbone:
    input:
        f"{OUT}/world/pretrain.json",
        f"{OUT}/world/pretrain_eval.json",
    output:
        f"{OUT}/backbones/{{backbone}}/training.json",
        f"{OUT}/backbones/{{backbone}}/unike_backbone.json",
    log:
        f"{OUT}/logs/pretrain_backbone/{{backbone}}.log",
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        unike("pretrain-backbone") + " --backbone {wildcards.backbone} > {log} 2>&1"


def backbone_ready(wildcards):
    """The file that proves a backbone directory is usable: the pretraining output of a
    tiny backbone; the config.json of a local one (given, not built: see external_input)."""
    path = LAYOUT.backbone_dir(wildcards.backbone)
    if config["backbones"][wildcards.backbone]["source"] == "local":
        return external_input(path / "config.json")
    return str(path / "unike_backbone.json")


rule mine_edits:
    input:
        backbone=backbone_ready,
        world=[f"{OUT}/world/{name}" for name in WORLD_FILES],
    output:
        f"{OUT}/data/{{backbone}}/mining.json",
        f"{OUT}/data/{{backbone}}/vqa_eval.json",
        f"{OUT}/data/{{backbone}}/caption_eval_edit.json",
        f"{OUT}/data/{{backbone}}/vqa_train.json",
        f"{OUT}/data/{{backbone}}/caption_train_edit.json",
    log:
        f"{OUT}/logs/mine_edits/{{backbone}}.log",
    threads: THREADS
    resources:
        mem_mb=3000,
        runtime=30,
        gpu=1 if ON_GPU else 0,
    shell:
        unike("mine-edits") + " --backbone {wildcards.backbone} > {log} 2>&1"
