"""UniKE's knowledge pipeline: triplets, hidden states at the intended tokens, encoders."""

import torch

from unike.backbones import Sample
from unike.method.encoders import EncoderConfig, semantic_loss, train_layer_encoders, truthfulness_loss
from unike.method.knowledge import (Triplet, extract_hidden_states, last_prompt_positions, last_token_positions,
                                    residual_streams, triplet_groups)


def test_hidden_states_are_taken_at_the_intended_tokens(backbone, vqa_cases):
    case = vqa_cases[0]
    t = Triplet(str(case.image), f"Question: {case.src} Short answer:", case.alt, case.pred)
    states = extract_hidden_states(backbone, [t], layers=[1])
    # Hand-made: the same sequences one at a time, positions counted by hand.
    for answer, key in ((t.a_pos, "pos.1"), (t.a_neg, "neg.1")):
        ids, start = backbone.sample_ids(Sample(case.image, t.prompt, answer))
        batch = backbone.encode([Sample(case.image, t.prompt, answer)])
        h = residual_streams(backbone, batch, [1])[1][0]
        torch.testing.assert_close(states[key][0], h[len(ids) - 1])
        torch.testing.assert_close(states["sem.1"][0], h[start - 1])  # last prompt token, never an answer token
    assert int(last_prompt_positions(batch)[0]) == start - 1 and int(last_token_positions(batch)[0]) == len(ids) - 1


def test_semantic_state_does_not_depend_on_the_answer(backbone, vqa_cases):
    case = vqa_cases[0]
    a = extract_hidden_states(backbone, [Triplet(str(case.image), case.src, case.alt, case.pred)], [0, 1])
    b = extract_hidden_states(backbone, [Triplet(str(case.image), case.src, "fish", "seeds")], [0, 1])
    assert torch.equal(a["sem.1"], b["sem.1"]) and not torch.equal(a["pos.1"], b["pos.1"])


def test_contrastive_losses_fall_on_a_toy_set():
    torch.manual_seed(0)
    n, d = 64, 16
    topic = torch.randn(n, d)  # what the question is about
    truth = torch.randn(d)  # a shared truthful direction
    sem, pos, neg = topic + 0.1 * torch.randn(n, d), topic + truth, topic - truth
    groups = torch.arange(n)
    cfg = EncoderConfig(truth_dim=8, hidden=32, lr=1e-3, steps=200, batch_size=32)
    enc, zeta, report = train_layer_encoders(sem, pos, neg, groups, cfg)
    first, last = report["curve"][0], report["curve"][-1]
    assert last["truthfulness"] < 0.5 * first["truthfulness"] and last["semantic"] < first["semantic"]
    assert report["heldout"]["truth_probe_acc"] >= 0.9
    with torch.no_grad():  # zeta points from negative to positive truthfulness
        assert float((enc.tru(pos) - enc.tru(neg)).mean(0) @ zeta) > 0


def test_loss_values_on_hand_computed_cases():
    # Two positives identical, two negatives identical and opposite: each anchor's only
    # same-label partner is maximally similar, so the loss is -log(e^s / (e^s + 2 e^-s)).
    z_pos = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    z_neg = -z_pos
    t = 1.0
    expected = -torch.log(torch.exp(torch.tensor(1.0)) / (torch.exp(torch.tensor(1.0)) + 2 * torch.exp(torch.tensor(-1.0))))
    torch.testing.assert_close(truthfulness_loss(z_pos, z_neg, t), expected)
    # Semantic: the query equals its own pair's encodings and is orthogonal to the others.
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    own = -torch.log(2 * torch.exp(torch.tensor(1.0)) / (2 * torch.exp(torch.tensor(1.0)) + 2))
    torch.testing.assert_close(semantic_loss(h, h.clone(), h.clone(), t), own)


def test_triplet_groups_join_the_same_question():
    ts = [Triplet("a.png", "q1", "x", "y"), Triplet("b.png", "q1", "x", "y"), Triplet("a.png", "q2", "x", "y")]
    assert triplet_groups(ts).tolist() == [0, 0, 1]
