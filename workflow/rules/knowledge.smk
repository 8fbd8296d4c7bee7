# UniKE's in-context knowledge, once per backbone: hallucination triplets from the train
# split, their hidden states at the edited layers, the contrastive encoders, and the
# encoders' spaces in 2-D (Figure 5a).


def knowledge_hash(stage):
    return lambda wc: settings.settings_hash(settings.knowledge_settings(config, wc.backbone, stage))


rule collect_triplets:
    input:
        backbone=backbone_ready,
        splits=lambda wc: annotation_files(wc.backbone, case_tasks(CROSS_TASK), "train"),
    output:
        out(Layout.KNOWLEDGE_PATTERN, "triplets.json"),
    params:
        settings=knowledge_hash("collect_triplets"),
    log:
        log_file("collect_triplets", "{backbone}.log"),
    threads: THREADS
    resources:
        mem_mb=memory(4000),
        runtime=120,
        gpu=1 if ON_GPU else 0,
    shell:
        unike("collect-triplets", "backbone")


rule extract_hidden_states:
    input:
        backbone=backbone_ready,
        triplets=out(Layout.KNOWLEDGE_PATTERN, "triplets.json"),
    output:
        out(Layout.KNOWLEDGE_PATTERN, "hidden_states.safetensors"),
    params:
        settings=knowledge_hash("extract_hidden_states"),
    log:
        log_file("extract_hidden_states", "{backbone}.log"),
    threads: THREADS
    resources:
        mem_mb=memory(8000),
        runtime=60,
        gpu=1 if ON_GPU else 0,
    shell:
        unike("extract-hidden-states", "backbone")


rule pretrain_encoders:
    input:
        out(Layout.KNOWLEDGE_PATTERN, "hidden_states.safetensors"),
    output:
        out(Layout.KNOWLEDGE_PATTERN, "encoders.safetensors"),
        out(Layout.KNOWLEDGE_PATTERN, "encoders.json"),
    params:
        settings=knowledge_hash("pretrain_encoders"),
    log:
        log_file("pretrain_encoders", "{backbone}.log"),
    threads: THREADS
    resources:
        mem_mb=memory(4000),
        runtime=60,
    shell:
        unike("pretrain-encoders", "backbone")


rule embed_spaces:  # Figure 5a: t-SNE of the semantic and truthfulness spaces (CPU, deterministic)
    input:
        states=out(Layout.KNOWLEDGE_PATTERN, "hidden_states.safetensors"),
        encoders=out(Layout.KNOWLEDGE_PATTERN, "encoders.safetensors"),
        report=out(Layout.KNOWLEDGE_PATTERN, "encoders.json"),
    output:
        out(Layout.KNOWLEDGE_PATTERN, "spaces.parquet"),
    params:
        settings=knowledge_hash("embed_spaces"),
    log:
        log_file("embed_spaces", "{backbone}.log"),
    threads: THREADS
    resources:
        mem_mb=memory(4000),
        runtime=30,
    shell:
        unike("embed-spaces", "backbone")
