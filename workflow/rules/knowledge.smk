# UniKE's in-context knowledge, once per backbone: hallucination triplets from the train
# split, their hidden states at the edited layers, the contrastive encoders, and the
# encoders' spaces in 2-D (Figure 5a).


def knowledge_hash(stage):
    return lambda wc: settings.settings_hash(settings.knowledge_settings(chain_config(wc), wc.backbone, stage))


rule collect_triplets:
    input:
        backbone=backbone_ready,
        splits=lambda wc: annotation_files(wc, case_tasks(CROSS_TASK), "train"),
    output:
        out(Layout.KNOWLEDGE_PATTERN, "triplets.json"),
    params:
        settings=knowledge_hash("collect_triplets"),
    log:
        log_file("collect_triplets", "{backbone}.log"),
    threads: THREADS
    resources:
        mem_mb=memory("collect_triplets"),
        runtime=time_limit("collect_triplets"),
        gpu=1 if ON_GPU else 0,
        gpu_mem_gb=gpu_memory("collect_triplets"),
        constraint=large_gpu("collect_triplets", "constraint"),
        gpu_model=large_gpu("collect_triplets", "gpu_model"),
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
        mem_mb=memory("extract_hidden_states"),
        runtime=time_limit("extract_hidden_states"),
        gpu=1 if ON_GPU else 0,
        gpu_mem_gb=gpu_memory("extract_hidden_states"),
        constraint=large_gpu("extract_hidden_states", "constraint"),
        gpu_model=large_gpu("extract_hidden_states", "gpu_model"),
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
        mem_mb=memory("pretrain_encoders"),
        runtime=time_limit("pretrain_encoders"),
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
        mem_mb=memory("embed_spaces"),
        runtime=time_limit("embed_spaces"),
    shell:
        unike("embed-spaces", "backbone")
