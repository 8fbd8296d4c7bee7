# The embedded tiny world (only when data.source is tiny-world).

WORLD_FILES = ["world.json", "pretrain.json", "pretrain_eval.json", *sorted(set(SPLIT_FILES.values()))]


rule make_world:
    output:
        [out(Layout.WORLD, name) for name in WORLD_FILES],
    params:
        settings=lambda wc: settings.settings_hash(settings.world_settings(chain_config(wc))),
    log:
        log_file("make_world") + ".log",
    resources:
        mem_mb=memory("make_world"),
        runtime=time_limit("make_world"),
    shell:
        unike("make-world")
