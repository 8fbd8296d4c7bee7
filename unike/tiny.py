"""Tiny backbones: real `Blip2ForConditionalGeneration` models with small configs,
pretrained on the old tiny world on CPU, saved and loaded exactly like real weights.

Configuration choices (vision tower init, Q-Former cross-attention in every layer, no
dropout, an explicit image token id) work around the transformers 5 Blip2 pitfalls
listed in docs/tiny-world.md.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from unike.backbones import IMAGE_TOKEN, Backbone, answer_predictions, cpu_device, save_backbone
from unike.data import Sample, vqa_prompt
from unike.world import stated_query

log = logging.getLogger(__name__)
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
FIXED_WORDS = ["question", "short", "answer", ":", "###", "human", "<", "img", ">", "</", "/",
               "new", "fact", "prompt"]  # the last three: IKE's "New Fact: ... Prompt: ..." demonstrations


@dataclass(frozen=True)
class TinyArch:
    text_model: str  # "opt" or "llama"
    hidden: int = 128
    layers: int = 4
    ffn: int = 512
    heads: int = 4
    vision_hidden: int = 128
    vision_layers: int = 2
    qformer_layers: int = 2
    num_query_tokens: int = 8
    patch_size: int = 8
    image_size: int = 64
    # Tie the output embedding to the input one; None: as the real model does (OPT ties,
    # LLaMA does not). Untied, a name the corpus rarely ends a sentence with has a barely
    # trained output row, and the backbone cannot copy it from context (docs/tiny-world.md).
    tie_embeddings: bool | None = None


@dataclass(frozen=True)
class PretrainConfig:
    # 900 steps at lr 2e-3 collapsed the Q-Former to image-independent outputs (docs/tiny-world.md);
    # this schedule does not, in half the time (held-out accuracy: benchmarks/RESULTS.md).
    steps: int = 450
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    text_fraction: float = 0.125  # share of each batch drawn from the (rare) text-only facts
    # Context phase (after the steps above): the language model alone learns to use a fact
    # stated in its prompt (context.json), with the vision side frozen and its image
    # features computed once. 0 steps: no context phase.
    context_steps: int = 0
    context_lr: float = 1e-3
    context_fraction: float = 0.5  # share of each context-phase batch that is context records
    seed: int = 0


def build_tokenizer(words: list[str]):
    """A lowercase word-level tokenizer over a closed vocabulary."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + [IMAGE_TOKEN]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words) | set(FIXED_WORDS)))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Whitespace() splits by \w+|[^\w\s]+, the rule the world's vocabulary is built with.
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS, additional_special_tokens=[IMAGE_TOKEN])


def text_config(kind: str, hidden: int, layers: int, heads: int, ffn: int, max_positions: int, tokenizer,
                vocab_size: int | None = None, tie_embeddings: bool | None = None):
    """An OPT or LLaMA text config (LLaMA: no grouped KV heads, as Vicuna-7B; embeddings
    tied as the real model ties them unless `tie_embeddings` says otherwise); `vocab_size`
    rows, by default the tokenizer's size."""
    ids = dict(vocab_size=vocab_size or len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if kind == "opt":
        from transformers import OPTConfig

        return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn, num_attention_heads=heads,
                         word_embed_proj_dim=hidden, max_position_embeddings=max_positions,
                         dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                         tie_word_embeddings=True if tie_embeddings is None else tie_embeddings, **ids)
    if kind == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
                           num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                           tie_word_embeddings=bool(tie_embeddings), **ids)
    raise ValueError(f"unknown text model {kind!r}")


def build_model(arch: TinyArch, tokenizer):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(
        hidden_size=arch.vision_hidden, intermediate_size=4 * arch.vision_hidden, num_hidden_layers=arch.vision_layers,
        num_attention_heads=4, image_size=arch.image_size, patch_size=arch.patch_size, initializer_range=0.02,
        attention_dropout=0.0,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=arch.vision_hidden, num_hidden_layers=arch.qformer_layers, num_attention_heads=4,
        intermediate_size=4 * arch.vision_hidden, cross_attention_frequency=1, encoder_hidden_size=arch.vision_hidden,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    text = text_config(arch.text_model, arch.hidden, arch.layers, arch.heads, arch.ffn, 256, tokenizer,
                       tie_embeddings=arch.tie_embeddings)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=arch.num_query_tokens,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    return Blip2ForConditionalGeneration(config)


def corpus_samples(records: list[dict], world_dir: Path) -> list[Sample]:
    """Pretraining records (kind, image, prompt, answer) as the samples editing will score."""
    samples = []
    for r in records:
        image = world_dir / r["image"] if r["image"] else None
        prompt = vqa_prompt(r["prompt"]) if r["kind"] == "vqa" else r["prompt"]
        samples.append(Sample(image, prompt, r["answer"]))
    return samples


@torch.no_grad()
def answer_predictions_of(backbone: Backbone, samples: list[Sample],
                          batch_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample, the teacher-forced argmax answer tokens and the answer's own tokens."""
    out = []
    for i in range(0, len(samples), batch_size):
        batch = backbone.encode(samples[i : i + batch_size])
        out += list(zip(answer_predictions(backbone.logits(batch), batch), batch.answer_targets()))
    return out


def answer_token_accuracy(backbone: Backbone, samples: list[Sample], topics: list[str],
                          batch_size: int = 128) -> dict:
    """Teacher-forced answer-token accuracy and exact match, overall and per topic."""
    return topic_accuracy(topics, answer_predictions_of(backbone, samples, batch_size))


def topic_accuracy(topics: list[str], predictions: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Answer-token accuracy and exact match of (prediction, target) pairs, overall and per topic."""
    per_topic: dict[str, list[int]] = {}  # topic -> [hits, tokens, exact, n]
    for topic, (p, t) in zip(topics, predictions):
        acc = per_topic.setdefault(topic, [0, 0, 0, 0])
        acc[0] += int((p == t).sum())
        acc[1] += len(t)
        acc[2] += int(bool((p == t).all()))
        acc[3] += 1
    hits, tokens, exact, n = (sum(v[k] for v in per_topic.values()) for k in range(4))
    return {"token_acc": hits / tokens, "exact_match": exact / n, "n": n,
            "by_topic": {k: {"token_acc": v[0] / v[1], "exact_match": v[2] / v[3], "n": v[3]}
                         for k, v in sorted(per_topic.items())}}


# Below this the pretraining collapsed: projected image features of different images differ
# by a few percent of their size (docs/tiny-world.md has the measured values).
COLLAPSED_SPREAD = 0.05


@torch.no_grad()
def image_feature_spread(backbone: Backbone, paths: list[Path], n_images: int = 64) -> float:
    """mean |f - mean f| / mean |f| over the projected image features of up to `n_images`
    images: how much what the language model sees depends on the image."""
    feats = backbone.image_features(paths[:n_images]).flatten(1).float()
    return float((feats - feats.mean(0)).norm(dim=1).mean() / feats.norm(dim=1).mean())


def pretrain(world_dir: Path, out_dir: Path, arch: TinyArch, train: PretrainConfig, prompt_style: str,
             vocabulary: list[str], threads: int = 1) -> dict:
    """Pretrain a tiny backbone on the old world; save it with `save_pretrained`."""
    torch.manual_seed(train.seed)
    torch.set_num_threads(threads)
    tokenizer = build_tokenizer(vocabulary)
    model = build_model(arch, tokenizer)
    backbone = Backbone("pretraining", model, tokenizer, prompt_style, arch.image_size)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()

    train_samples = corpus_samples(json.loads((world_dir / "pretrain.json").read_text(encoding="utf-8")), world_dir)
    heldout_records = json.loads((world_dir / "pretrain_eval.json").read_text(encoding="utf-8"))
    heldout = corpus_samples(heldout_records, world_dir)
    pixels_of = _pixel_table(backbone, train_samples)

    opt = torch.optim.AdamW([p for p in model.parameters()], lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / train.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, train.steps) / train.steps)))
    gen = torch.Generator().manual_seed(train.seed)
    text_idx = [i for i, s in enumerate(train_samples) if s.image is None]
    image_idx = [i for i, s in enumerate(train_samples) if s.image is not None]
    n_text = round(train.batch_size * train.text_fraction) if text_idx else 0
    history = []
    t0 = time.time()
    for step in range(train.steps):
        idx = ([image_idx[i] for i in torch.randint(len(image_idx), (train.batch_size - n_text,), generator=gen)]
               + [text_idx[i] for i in torch.randint(len(text_idx), (n_text,), generator=gen)])
        batch = backbone.encode([train_samples[i] for i in idx], with_eos=True)
        # Training needs gradients through the vision tower, so features are not cached here.
        batch.image_features = (model.get_image_features(pixels_of(batch.images)).pooler_output
                                if batch.image_rows else None)
        logits = backbone.logits(batch)
        target = batch.input_ids[:, 1:]
        mask = batch.answer_mask[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][mask], target[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == train.steps - 1:
            history.append({"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0], "s": time.time() - t0})
            log.info("pretrain step %d/%d loss %.4f (%.0f s)", step, train.steps, float(loss.detach()), time.time() - t0)

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    topics = [r["topic"] for r in heldout_records]
    context = None
    if train.context_steps:
        before = answer_token_accuracy(backbone, heldout, topics)
        context = context_phase(backbone, world_dir, train_samples, train, threads)
        context["plain_before"] = _summary(before)
    backbone.clear_image_cache()
    heldout_acc = answer_token_accuracy(backbone, heldout, topics)
    log.info("held-out answer-token accuracy %.3f, exact match %.3f", heldout_acc["token_acc"], heldout_acc["exact_match"])
    for topic, acc in heldout_acc["by_topic"].items():
        log.info("  %-14s token accuracy %.3f (n=%d)", topic, acc["token_acc"], acc["n"])
    spread = image_feature_spread(backbone, sorted({s.image for s in heldout if s.image is not None}))
    log.info("image-feature spread %.3f (collapsed below %.2f)", spread, COLLAPSED_SPREAD)
    if spread < COLLAPSED_SPREAD:
        log.warning("image-feature spread %.3f < %.2f: the Q-Former output barely depends on the image; this "
                    "backbone is image-blind and its edits mean little (docs/tiny-world.md, pretraining collapse)",
                    spread, COLLAPSED_SPREAD)
    report = {"arch": arch.__dict__, "pretrain": train.__dict__, "heldout": heldout_acc, "history": history,
              "image_feature_spread": spread, "train_s": time.time() - t0, "n_train_samples": len(train_samples),
              "context": context, "device": cpu_device(threads)}
    save_backbone(out_dir, model, tokenizer, prompt_style, arch.image_size, {"tiny": True})
    (out_dir / "training.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def _summary(acc: dict) -> dict:
    """Overall and per-topic exact match and token accuracy, without the counts."""
    return {"token_acc": acc["token_acc"], "exact_match": acc["exact_match"],
            "by_topic": {k: {"token_acc": v["token_acc"], "exact_match": v["exact_match"]}
                         for k, v in acc["by_topic"].items()}}


_MICRO_BATCH = 16


def context_phase(backbone: Backbone, world_dir: Path, plain: list[Sample], train: PretrainConfig,
                  threads: int = 1) -> dict:
    """Teach the pretrained backbone to answer from a fact stated in its prompt.

    Only the language model trains: the vision tower, Q-Former and projection stay as
    pretraining left them, so every image's features are computed once (the phase costs
    what text training costs). Each batch mixes context records with the plain corpus,
    which keeps the memorised facts (without plain rows they fell to 55-62% within 100
    steps in the probe behind docs/tiny-world.md). The held-out figures (`context_use`)
    are measured on context_eval.json: the eval split's creatures, never stated in a
    training record, on held-out renders.
    """
    torch.set_num_threads(threads)
    model = backbone.model
    records = json.loads((world_dir / "context.json").read_text(encoding="utf-8"))
    eval_records = json.loads((world_dir / "context_eval.json").read_text(encoding="utf-8"))
    samples = corpus_samples(records, world_dir)
    lm = [p for p in backbone.text.lm.parameters()]
    for p in lm:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(lm, lr=train.context_lr, weight_decay=train.weight_decay)
    warmup = max(1, train.context_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)
                                              * 0.5 * (1 + math.cos(math.pi * s / train.context_steps)))
    gen = torch.Generator().manual_seed(train.seed + 1)
    n_context = round(train.batch_size * train.context_fraction)
    history, t0 = [], time.time()
    model.train()
    for step in range(train.context_steps):
        idx = torch.randint(len(samples), (n_context,), generator=gen).tolist()
        rest = torch.randint(len(plain), (train.batch_size - n_context,), generator=gen).tolist()
        chosen = [samples[i] for i in idx] + [plain[i] for i in rest]
        # Context records run from 20 to 230 tokens: padding the whole batch to its longest
        # cost most of the step, so it runs as micro-batches of similar length, one update.
        chosen.sort(key=lambda s: len(backbone.sample_ids(s)[0]))
        micro = [backbone.encode(chosen[i: i + _MICRO_BATCH], with_eos=True)
                 for i in range(0, len(chosen), _MICRO_BATCH)]
        n_tokens = sum(int(b.answer_mask[:, 1:].sum()) for b in micro)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for batch in micro:
            logits = backbone.logits(batch)  # image features: computed once, cached by path
            mask = batch.answer_mask[:, 1:]
            part = torch.nn.functional.cross_entropy(logits[:, :-1][mask], batch.input_ids[:, 1:][mask],
                                                     reduction="sum") / n_tokens
            part.backward()
            loss += float(part.detach())
        torch.nn.utils.clip_grad_norm_(lm, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == train.context_steps - 1:
            history.append({"step": step, "loss": loss, "s": time.time() - t0})
            log.info("context step %d/%d loss %.4f (%.0f s)", step, train.context_steps, loss, time.time() - t0)
    model.eval()
    for p in lm:
        p.requires_grad_(False)
    use = context_use(backbone, eval_records, world_dir)
    log.info("context use, held out: follows the stated fact %.3f (%s), keeps its own answer %.3f (another "
             "creature) and %.3f (another fact)", use["heldout"]["follow"],
             ", ".join(f"{k} {v:.3f}" for k, v in use["follow_by_statement"].items()),
             use["heldout"]["keep_other"], use["heldout"]["keep_otherfact"])
    return use | {"history": history, "train_s": time.time() - t0, "n_records": len(records)}


def context_use(backbone: Backbone, records: list[dict], world_dir: Path) -> dict:
    """How the backbone uses the facts stated in context records (exact match, teacher forced).

    `follow`: the answer is the stated fact (context-follow records), also per kind of
    statement (a VQA question, a caption, a text question). `keep_other` and
    `keep_otherfact`: the stated fact is about another creature (or a scene's picture) or
    the same creature's other fact, and the answer is the one the backbone gives to the
    same prompt without the context, its own knowledge whether right or wrong (a blind
    copier scores 0, a backbone that ignores context 1). `heldout_detail` holds every
    topic's exact match and token accuracy against the world's answers.
    """
    with_context = answer_predictions_of(backbone, corpus_samples(records, world_dir), batch_size=32)
    alone = answer_predictions_of(
        backbone, corpus_samples([r | {"prompt": stated_query(r["prompt"])} for r in records], world_dir))
    hits: dict[str, list[bool]] = {}
    for r, (pred, target), (own, _) in zip(records, with_context, alone):
        if r["topic"] == "context-follow":
            hit = bool((pred == target).all())
            hits.setdefault("follow", []).append(hit)
            hits.setdefault(f"follow/{r['statement']}", []).append(hit)
        else:
            key = {"context-other": "keep_other", "context-otherfact": "keep_otherfact"}[r["topic"]]
            hits.setdefault(key, []).append(bool((pred == own).all()))
    rate = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    detail = topic_accuracy([r["topic"] for r in records], with_context)
    return {"heldout": {k: rate.get(k, 0.0) for k in ("follow", "keep_other", "keep_otherfact")},
            "heldout_n": {k: len(hits.get(k, [])) for k in ("follow", "keep_other", "keep_otherfact")},
            "follow_by_statement": {k.split("/")[1]: v for k, v in rate.items() if k.startswith("follow/")},
            "heldout_detail": _summary(detail)}


def _pixel_table(backbone: Backbone, samples: list[Sample]):
    """All pretraining images preprocessed once, looked up by path."""
    paths = sorted({s.image for s in samples if s.image is not None})
    pixels = backbone.load_pixels(paths)
    index = {p: i for i, p in enumerate(paths)}
    return lambda batch_paths: pixels[[index[p] for p in batch_paths]]

