# The embedded tiny world (only when data.source is tiny-world).

WORLD_FILES = ["world.json", "pretrain.json", "pretrain_eval.json", "vqa_train.json", "vqa_eval.json",
               "caption_train_edit.json", "caption_eval_edit.json"]


rule make_world:
    output:
        [f"{OUT}/world/{name}" for name in WORLD_FILES],
    log:
        f"{OUT}/logs/make_world.log",
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        unike("make-world") + " > {log} 2>&1"
