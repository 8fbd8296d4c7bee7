"""The backbone wrapper against transformers' own Blip2 forward, on untrained tiny models."""

import pytest
import torch

from unike.backbones import answer_predictions
from unike.data import case_samples, Sample


def test_logits_match_blip2_forward(backbone, vqa_cases):
    """Our path (cached image features written into the placeholders) equals
    Blip2ForConditionalGeneration.forward on the same inputs."""
    sample = case_samples(vqa_cases[0])[0]
    batch = backbone.encode([sample])
    ours = backbone.logits(batch)
    pixels = backbone.load_pixels([sample.image])
    with torch.no_grad():
        ref = backbone.model(pixel_values=pixels, input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(ours, ref)


def test_mixed_batch_rows_match_single_rows(backbone, vqa_cases):
    """Right padding and text-only rows next to image rows leave each row's answer logits unchanged."""
    samples = case_samples(vqa_cases[0])
    batch = backbone.encode(samples)
    together = backbone.logits(batch)
    for i, sample in enumerate(samples):
        single_batch = backbone.encode([sample])
        single = backbone.logits(single_batch)
        n = single.shape[1]
        torch.testing.assert_close(together[i, :n][single_batch.answer_mask[0]], single[0][single_batch.answer_mask[0]],
                                   atol=1e-5, rtol=1e-5)


def test_text_only_row_is_the_plain_language_model(backbone, vqa_cases):
    t_loc = case_samples(vqa_cases[0])[3]
    batch = backbone.encode([t_loc])
    with torch.no_grad():
        ref = backbone.model.language_model(input_ids=batch.input_ids).logits
    torch.testing.assert_close(backbone.logits(batch), ref)


@pytest.mark.parametrize("layer", [0, 1])
def test_prefix_then_remaining_layers_is_bit_exact(backbone, vqa_cases, layer):
    batch = backbone.encode(case_samples(vqa_cases[1]))
    full = backbone.logits(batch)
    with torch.no_grad():
        resumed = backbone.logits_from(backbone.prefix(batch, layer))
    assert torch.equal(full, resumed)


def test_image_placeholders_and_answer_boundary(backbone, vqa_cases):
    sample = case_samples(vqa_cases[0])[0]
    ids, start = backbone.sample_ids(sample)
    assert ids.count(backbone.image_token_id) == backbone.num_query_tokens
    answer = backbone.tokenizer.decode(ids[start:])
    assert answer.strip() == sample.answer
    if backbone.prompt_style == "blip2":
        assert ids[: backbone.num_query_tokens] == [backbone.image_token_id] * backbone.num_query_tokens
        assert ids[backbone.num_query_tokens] == backbone.bos_id
    else:
        text = backbone.tokenizer.decode(ids[: ids.index(backbone.image_token_id)], skip_special_tokens=True)
        assert text.replace(" ", "") == "###human:<img>"


def test_unclean_prompt_answer_boundary_is_rejected(backbone):
    # An answer that adds no token of its own cannot be scored.
    with pytest.raises(ValueError, match="clean token boundary"):
        backbone.sample_ids(Sample(None, "what does the", ""))


def test_image_features_are_cached_by_path(backbone, vqa_cases):
    path = vqa_cases[0].image
    first = backbone.image_features([path])
    backbone.model.vision_model.embeddings.patch_embedding.weight.data.add_(1.0)  # would change a recomputation
    assert torch.equal(backbone.image_features([path]), first)


def test_answer_predictions_align_with_targets(backbone, vqa_cases):
    batch = backbone.encode(case_samples(vqa_cases[0]))
    preds = answer_predictions(backbone.logits(batch), batch)
    for p, t in zip(preds, batch.answer_targets()):
        assert p.shape == t.shape and len(t) > 0


def test_batched_greedy_equals_one_at_a_time(backbone, vqa_cases, caption_cases):
    samples = [case_samples(c)[i] for c in vqa_cases[:3] + caption_cases[:2] for i in (0, 3, 4)]
    together = backbone.greedy(samples, max_new_tokens=4)
    assert together == [backbone.greedy([s], max_new_tokens=4)[0] for s in samples]
    assert all(isinstance(a, str) for a in together)


def test_prefix_can_be_replayed_without_growing_a_cache(backbone, vqa_cases):
    """Editors run the upper layers many times on one prefix: each run must be the same."""
    batch = backbone.encode(case_samples(vqa_cases[1]))
    prefix = backbone.prefix(batch, 1)
    with torch.no_grad():
        first, second = backbone.logits_from(prefix), backbone.logits_from(prefix)
    assert torch.equal(first, second) and torch.equal(first, backbone.logits(batch))
