"""UniKE's knowledge pipeline: triplets, hidden states at the intended tokens, encoders."""

import pytest
import torch

from unike.data import Sample
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


# ---------------------------------------------------------------- Figure 5a: t-SNE of the spaces
def _one_nn_agreement(y: torch.Tensor, labels: torch.Tensor) -> float:
    d = torch.cdist(y, y)
    d.fill_diagonal_(float("inf"))
    return float((labels[d.argmin(1)] == labels).double().mean())


def test_tsne_separates_two_gaussian_clusters_deterministically():
    from unike.method.tsne import TSNEConfig, tsne

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 10, generator=g), torch.randn(40, 10, generator=g) + 6.0])
    labels = torch.arange(80) // 40
    y, kl = tsne(x, TSNEConfig(perplexity=10, seed=1))
    assert _one_nn_agreement(y, labels) > 0.95 and 0 < kl < 1.0
    again, kl_again = tsne(x, TSNEConfig(perplexity=10, seed=1))
    assert torch.equal(y, again) and kl == kl_again
    assert not torch.equal(y, tsne(x, TSNEConfig(perplexity=10, seed=2))[0])


def test_tsne_rows_are_calibrated_to_the_perplexity():
    from unike.method.tsne import affinities, conditionals

    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    p = conditionals(x, 12.0)
    entropy = -(p * p.clamp(min=1e-300).log()).sum(1)
    torch.testing.assert_close(entropy.exp(), torch.full((50,), 12.0, dtype=torch.float64), rtol=1e-4, atol=0)
    joint = affinities(x, 12.0)
    torch.testing.assert_close(joint, joint.T)
    assert float(joint.sum()) == pytest.approx(1.0, abs=1e-6)


def test_embed_spaces_separates_truthfulness_not_semantics(tmp_path):
    import json

    import pyarrow.parquet as pq

    from unike.method.encoders import embed_spaces, pretrain_encoders
    from unike.method.knowledge import save_hidden_states, save_triplets
    from unike.method.tsne import TSNEConfig

    g = torch.Generator().manual_seed(0)
    n, d = 48, 16
    topic, truth = 3 * torch.randn(n, d, generator=g), torch.randn(d, generator=g)
    states = {}
    for layer, shift in ((0, torch.zeros(d)), (1, truth)):  # only the last layer knows the truth
        states.update({f"sem.{layer}": topic + 0.1 * torch.randn(n, d, generator=g),
                       f"pos.{layer}": topic + shift, f"neg.{layer}": topic - shift})
    save_triplets(tmp_path / "triplets.json", [Triplet(None, f"q{i}", "yes", "no") for i in range(n)])
    save_hidden_states(tmp_path / "hidden_states.safetensors", states, [0, 1])
    pretrain_encoders(tmp_path, EncoderConfig(truth_dim=8, hidden=32, lr=1e-3, steps=200, batch_size=32))
    out = tmp_path / "spaces.parquet"
    summary = embed_spaces(tmp_path, out, 40, TSNEConfig(perplexity=10))
    table = pq.read_table(out)
    assert [(f.name, str(f.type)) for f in table.schema] == [
        ("space", "string"), ("polarity", "string"), ("triplet", "int64"), ("x", "double"), ("y", "double")]
    assert json.loads(table.schema.metadata[b"tsne"]) == summary and summary["layer"] == 1
    assert set(summary["kl"]) == {"semantic", "truthfulness"}
    rows = table.to_pylist()
    chosen = [r["triplet"] for r in rows if r["space"] == "semantic" and r["polarity"] == "positive"]
    assert len(chosen) == len(set(chosen)) == 40 and set(chosen) <= set(range(n))
    for space in ("semantic", "truthfulness"):
        for polarity in ("positive", "negative"):
            assert [r["triplet"] for r in rows if (r["space"], r["polarity"]) == (space, polarity)] == chosen
    agreement = {}
    for space in ("semantic", "truthfulness"):
        part = [r for r in rows if r["space"] == space]
        y = torch.tensor([[r["x"], r["y"]] for r in part])
        agreement[space] = _one_nn_agreement(y, torch.tensor([r["polarity"] == "positive" for r in part]))
    # Figure 5a's claim: positives and negatives mix in the semantic space (a positive's
    # neighbour is mostly its own negative) and separate in the truthfulness space.
    assert agreement["truthfulness"] > 0.9 and agreement["semantic"] < 0.5
    embed_spaces(tmp_path, tmp_path / "again.parquet", 40, TSNEConfig(perplexity=10))
    assert pq.read_table(tmp_path / "again.parquet").equals(table)
