# UniKE's in-context knowledge, once per backbone: hallucination triplets from the train
# split, their hidden states at the edited layers, the contrastive encoders, and the
# encoders' spaces in 2-D (Figure 5a).


rule collect_triplets:
    input:
        backbone=backbone_ready,
        splits=lambda wc: annotation_files(wc.backbone, ("e-vqa", "e-ic"), "train"),
    output:
        f"{OUT}/knowledge/{{backbone}}/triplets.json",
    log:
        f"{OUT}/logs/collect_triplets/{{backbone}}.log",
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=1 if ON_GPU else 0,
    shell:
        unike("collect-triplets") + " --backbone {wildcards.backbone} > {log} 2>&1"


rule extract_hidden_states:
    input:
        backbone=backbone_ready,
        triplets=f"{OUT}/knowledge/{{backbone}}/triplets.json",
    output:
        f"{OUT}/knowledge/{{backbone}}/hidden_states.safetensors",
    log:
        f"{OUT}/logs/extract_hidden_states/{{backbone}}.log",
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1 if ON_GPU else 0,
    shell:
        unike("extract-hidden-states") + " --backbone {wildcards.backbone} > {log} 2>&1"


rule pretrain_encoders:
    input:
        f"{OUT}/knowledge/{{backbone}}/hidden_states.safetensors",
    output:
        f"{OUT}/knowledge/{{backbone}}/encoders.safetensors",
        f"{OUT}/knowledge/{{backbone}}/encoders.json",
    log:
        f"{OUT}/logs/pretrain_encoders/{{backbone}}.log",
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        unike("pretrain-encoders") + " --backbone {wildcards.backbone} > {log} 2>&1"


rule embed_spaces:  # Figure 5a: t-SNE of the semantic and truthfulness spaces (CPU, deterministic)
    input:
        states=f"{OUT}/knowledge/{{backbone}}/hidden_states.safetensors",
        encoders=f"{OUT}/knowledge/{{backbone}}/encoders.safetensors",
        report=f"{OUT}/knowledge/{{backbone}}/encoders.json",
    output:
        f"{OUT}/knowledge/{{backbone}}/spaces.parquet",
    log:
        f"{OUT}/logs/embed_spaces/{{backbone}}.log",
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        unike("embed-spaces") + " --backbone {wildcards.backbone} > {log} 2>&1"
