"""UniKE's editor on untrained tiny backbones, with a knowledge folder built by the real
pipeline functions (triplets -> hidden states -> encoders)."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from baselines.ike import IKE
from unike.data import case_samples, edit_sample
from unike.incontext import DEMO_SEPARATOR
from unike.method.editor import UniKE, UniKEHparams, distinct_keys
from unike.method.encoders import EncoderConfig, pretrain_encoders
from unike.method.knowledge import (collect_triplets, extract_hidden_states, last_prompt_positions,
                                    save_hidden_states, save_triplets)
from unike.neurons import key_init


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py



def one_token(case):
    """The case with a one-token answer (the last word of its two-word value)."""
    return dataclasses.replace(case, alt=case.alt.split()[-1])

def _knowledge_and_prepared(backbone, train, tmp_path):
    knowledge, prepared = tmp_path / "knowledge", tmp_path / "prepared"
    knowledge.mkdir()
    prepared.mkdir()
    triplets = collect_triplets(backbone, train, limit=100, max_new_tokens=3)
    assert len(triplets) >= 4  # an untrained model is wrong on (nearly) everything
    save_triplets(knowledge / "triplets.json", triplets)
    layers = list(range(len(backbone.text)))
    save_hidden_states(knowledge / "hidden_states.safetensors", extract_hidden_states(backbone, triplets, layers), layers)
    pretrain_encoders(knowledge, EncoderConfig(truth_dim=8, hidden=32, steps=20, batch_size=8))
    UniKE.prepare(backbone, UniKEHparams(memory_size=2000), train, prepared, 0, knowledge=knowledge)
    return knowledge, prepared


@pytest.fixture
def unike_dirs(backbone, vqa_cases, caption_cases, tmp_path):
    return _knowledge_and_prepared(backbone, vqa_cases[2:] + caption_cases, tmp_path)


@pytest.fixture
def ike_dirs(backbone, vqa_cases, caption_cases, unike_dirs, tmp_path):
    """The same knowledge, prepared for `external: ike` (FFN memory + demonstration bank)."""
    knowledge, _ = unike_dirs
    prepared = tmp_path / "prepared-ike"
    prepared.mkdir()
    summary = UniKE.prepare(backbone, UniKEHparams(memory_size=2000, external="ike"), vqa_cases[2:] + caption_cases,
                            prepared, 0, knowledge=knowledge)
    assert summary["demo_bank"]["n_demos"] == 3 * (len(vqa_cases) - 2 + len(caption_cases))
    return knowledge, prepared


def _unike(backbone, dirs, **hp):
    knowledge, prepared = dirs
    return UniKE(backbone, {"memory_size": 2000, **hp}, prepared, knowledge=knowledge)


def test_alpha_zero_without_neurons_reproduces_the_unedited_model_bit_exactly(backbone, vqa_cases, unike_dirs):
    samples = case_samples(vqa_cases[0])
    batch = backbone.encode(samples)
    before = backbone.logits(batch)
    editor = _unike(backbone, unike_dirs, intrinsic=False, alpha=0.0)
    editor.edit(vqa_cases[0])  # adds the edit's own knowledge pair, no neurons
    after = editor._forward(backbone.encode(samples))
    assert torch.equal(before, after)
    editor.close()


def test_latent_knowledge_shifts_the_output_when_included(backbone, vqa_cases, unike_dirs):
    samples = case_samples(vqa_cases[0])
    before = backbone.logits(backbone.encode(samples))
    editor = _unike(backbone, unike_dirs, intrinsic=False, alpha=0.5)
    editor.edit(vqa_cases[0])
    assert not torch.allclose(before, editor._forward(backbone.encode(samples)))
    editor.close()


def test_knowledge_keys_and_values_reused_only_for_the_same_entries(backbone, vqa_cases, unike_dirs):
    """Retrieved entries' keys and values are reused while the same entries are retrieved,
    and never across edits: after a restore, the next edit's own entry takes the index the
    last edit's had, and must be seen as itself (as by an editor that never saw the first)."""
    samples = case_samples(vqa_cases[1])
    fresh = _unike(backbone, unike_dirs, intrinsic=False, alpha=0.5)
    fresh.edit(vqa_cases[1])
    expected = fresh._forward(backbone.encode(samples))
    fresh.close()
    editor = _unike(backbone, unike_dirs, intrinsic=False, alpha=0.5)
    editor.edit(vqa_cases[0])
    editor._forward(backbone.encode(samples))
    editor.restore()
    editor.edit(vqa_cases[1])
    first = editor._forward(backbone.encode(samples))
    assert torch.equal(first, expected)
    assert torch.equal(editor._forward(backbone.encode(samples)), first)  # from the cached keys and values
    editor.close()


def test_retrieval_ignores_answer_tokens(backbone, vqa_cases, unike_dirs):
    """The query sits at the last prompt token, so changing the answer changes nothing retrieved."""
    editor = _unike(backbone, unike_dirs, intrinsic=False, alpha=0.5)
    case = vqa_cases[0]
    seen = []
    hook = editor.latent._retrieve_hook

    def spy(layer, args, kwargs):
        hook(layer, args, kwargs)
        seen.append(editor.latent._state[layer][1].clone())

    editor.latent._retrieve_hook = spy
    for answer in (case.alt, "fish seeds"):
        sample = edit_sample(case).__class__(case.image, edit_sample(case).prompt, answer)
        batch = backbone.encode([sample])
        assert int(last_prompt_positions(batch)[0]) < int(batch.answer_mask[0].nonzero()[0])
        editor._forward(batch)
    n = len(seen) // 2
    assert all(torch.equal(a, b) for a, b in zip(seen[:n], seen[n:]))
    editor.close()


@pytest.mark.parametrize("variant", ["full", "intrin+ike"])
def test_one_step_edit_fixes_the_mistake_and_restores_exactly(backbone, vqa_cases, unike_dirs, request, variant):
    """UniKE (latent knowledge, fixed alpha) and Intrin+IKE (demonstrations in the prompt),
    on a one-token answer (the untrained test backbone; multi-token edits: test_unike_variants)."""
    case = one_token(vqa_cases[0])
    weights = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    other = case_samples(vqa_cases[1])
    untouched = backbone.logits(backbone.encode(other))
    if variant == "full":
        editor = _unike(backbone, unike_dirs, max_steps=200, alpha=0.2)
    else:
        editor = _unike(backbone, request.getfixturevalue("ike_dirs"), external="ike", zeta="none", max_steps=200)
    (pred,), (target,) = editor.predict([edit_sample(case)])
    assert not torch.equal(pred, target)
    editor.edit(case)
    (pred,), (target,) = editor.predict([edit_sample(case)])
    assert torch.equal(pred, target)
    editor.restore()
    assert all(torch.equal(weights[k], v) for k, v in backbone.model.state_dict().items())
    if variant == "intrin+ike":  # no demonstrations are left (latent knowledge stays attached until close)
        assert torch.equal(editor._forward(backbone.encode(other)), untouched)
    editor.close()  # detaches the latent knowledge hooks
    assert torch.equal(backbone.logits(backbone.encode(other)), untouched)


def test_zeta_is_mapped_once_and_each_variant_regulates_differently(backbone, vqa_cases, unike_dirs):
    knowledge, _ = unike_dirs
    editors = {z: _unike(backbone, unike_dirs, external="none", zeta=z, max_steps=3)
               for z in ("truthfulness", "random", "semantic", "none")}
    truth = editors["truthfulness"]
    layer = truth.layers[-1]
    # W_zeta is learned once: every edit's neurons carry the same beta * zeta', a buffer
    # that training does not touch.
    truth.edit(vqa_cases[0])
    truth.edit(vqa_cases[1])
    sets = truth.patcher.neurons[layer]
    assert len(sets) == 2 and all(torch.equal(n.regulation, truth.regulation[layer]) for n in sets)
    assert all(n.regulation is not p for n in sets for p in n.parameters())
    truth.restore()
    # zeta' points from the hallucinated states to the truthful ones; a random zeta through
    # the same map does not; without zeta there is no regulation.
    states = load_file(str(knowledge / "hidden_states.safetensors"))
    towards_truth = states[f"pos.{layer}"].mean(0) - states[f"neg.{layer}"].mean(0)

    def cos(kind):
        return float(torch.nn.functional.cosine_similarity(editors[kind].regulation[layer], towards_truth, dim=0))

    assert cos("truthfulness") > 0.9 and abs(cos("random")) < 0.9
    assert not torch.equal(editors["semantic"].regulation[layer], truth.regulation[layer])
    assert editors["none"].regulation[layer] is None
    with pytest.raises(ValueError, match="unknown variant"):
        _unike(backbone, unike_dirs, zeta="sideways")


def test_neurons_of_a_one_token_answer_start_and_stay_distinct(backbone, vqa_cases, unike_dirs):
    """All n neurons start on the one answer-predicting position; identical keys would stay identical."""
    case = one_token(vqa_cases[0])
    assert int(backbone.encode([edit_sample(case)]).answer_mask.sum()) == 1
    editor = _unike(backbone, unike_dirs, external="none", n_neurons=5, max_steps=50)
    editor.edit(case)
    for layer, (neurons,) in editor.patcher.neurons.items():
        keys = torch.nn.functional.normalize(neurons.keys, dim=-1)
        cosines = keys @ keys.T
        assert len(keys) == 5 and float(cosines[~torch.eye(5, dtype=torch.bool)].max()) < 0.99, layer
    editor.restore()


def test_spread_keys_still_fire_exactly_once_on_their_own_input(backbone):
    queries = torch.randn(1, 32).expand(4, 32)
    keys = distinct_keys(queries, 1.0)
    torch.testing.assert_close((keys * queries).sum(-1), torch.ones(4))
    torch.testing.assert_close(distinct_keys(queries, 0.0), key_init(queries))


def test_no_neurons_when_the_latent_knowledge_alone_fixes_the_edit(world_config, vqa_cases, caption_cases, tmp_path):
    """A backbone that leans on its attention output (out_proj scaled up), so the retrieved
    knowledge states steer its answer: an edit they already fix gets no neurons, and the
    edited model is the latent-only one on every scored input."""
    from tests.conftest import make_backbone
    from unike.method.latent_ike import _attention_parts

    backbone = make_backbone(world_config, "opt")
    with torch.no_grad():
        for layer in range(len(backbone.text)):
            _attention_parts(backbone, layer)[2].weight.mul_(30)
    dirs = _knowledge_and_prepared(backbone, vqa_cases[2:] + caption_cases, tmp_path)
    latent_only = dict(intrinsic=False, alpha=1.0)
    fixed = None
    def steer(case):  # the latent-only model's answer to the edit input, and the target
        editor = _unike(backbone, dirs, **latent_only)
        editor.edit(case)  # the edit's own knowledge pair holds its answer: steering depends on it
        (pred,), (target,) = editor.predict([edit_sample(case)])
        editor.restore()
        editor.close()
        return pred, target

    for case in map(one_token, vqa_cases):  # an answer the latent knowledge gives, where the bare model gives another
        candidate = dataclasses.replace(case, alt=backbone.tokenizer.decode(steer(case)[0]).strip())
        pred, target = steer(candidate)
        bare = backbone.encode([edit_sample(candidate)])
        if torch.equal(pred, target) and not torch.equal(
                backbone.logits(bare)[0, :-1].argmax(-1)[bare.answer_mask[0, 1:]], target):
            fixed = candidate
            break
    assert fixed is not None
    results = {}
    for name, hp in (("latent-only", latent_only), ("unike", dict(alpha=1.0))):
        editor = _unike(backbone, dirs, **hp)
        editor.edit(fixed)
        assert not editor.patcher.neurons, name
        results[name] = editor.predict(case_samples(fixed) + case_samples(vqa_cases[1]))
        editor.restore()
        editor.close()
    (preds, targets), (unike_preds, _) = results["latent-only"], results["unike"]
    assert torch.equal(preds[0], targets[0])  # the latent knowledge fixed the edit
    assert all(torch.equal(a, b) for a, b in zip(preds, unike_preds))


# ---------------------------------------------------------------- Intrin+IKE (Table 4 row 3)
def _contains(row: list[int], part: list[int]) -> bool:
    return any(row[i : i + len(part)] == part for i in range(len(row) - len(part) + 1))


def test_intrin_ike_scored_inputs_carry_the_retrieved_demonstrations(backbone, vqa_cases, ike_dirs):
    editor = _unike(backbone, ike_dirs, external="ike", zeta="none", ike_k=3, max_steps=5)
    assert editor.latent is None and not UniKE.supports_sequential(editor.hparams)
    case = vqa_cases[0]
    seen = []
    forward = editor._forward
    editor._forward = lambda batch, *stream: seen.append(batch) or forward(batch, *stream)
    editor.edit(case)
    seen.clear()
    editor.predict(case_samples(case))
    demos = editor.demonstrations
    top = demos.demos[demos.retrieved[0][0]]
    top_ids = backbone.tokenizer(top + DEMO_SEPARATOR, add_special_tokens=False)["input_ids"]
    (batch,) = seen
    assert len(demos.retrieved) == 3
    rows = [row[mask.bool()].tolist() for row, mask in zip(batch.input_ids, batch.attention_mask)]
    assert all(_contains(row, top_ids) for row in rows)
    with pytest.raises(RuntimeError, match="one edit"):
        editor.edit(vqa_cases[1])
    editor.restore()
    seen.clear()
    editor.predict(case_samples(case))  # restored: the bare inputs again
    assert not any(_contains(row.tolist(), top_ids) for row in seen[0].input_ids)


def test_intrin_ike_without_neurons_is_the_ike_baseline(backbone, vqa_cases, caption_cases, ike_dirs, tmp_path):
    bank = tmp_path / "ike-bank"
    bank.mkdir()
    IKE.prepare(backbone, IKE.Hparams(), vqa_cases[2:] + caption_cases, bank, 0)
    ike = IKE(backbone, {"k": 4}, bank)
    ours = _unike(backbone, ike_dirs, intrinsic=False, external="ike", zeta="none", ike_k=4)
    for case in vqa_cases[:2] + caption_cases[:2]:
        ike.edit(case)
        ours.edit(case)
        assert ours.demonstrations.retrieved == ike.demonstrations.retrieved
        (p_ike, t_ike), (p_ours, t_ours) = ike.predict(case_samples(case)), ours.predict(case_samples(case))
        assert all(torch.equal(a, b) for a, b in zip(p_ike + t_ike, p_ours + t_ours))
        ike.restore()
        ours.restore()


def test_alpha_needs_latent_knowledge(backbone, ike_dirs):
    with pytest.raises(ValueError, match="alpha weighs latent knowledge"):
        _unike(backbone, ike_dirs, external="ike", alpha=0.5)


def test_intrin_ike_variants_share_a_prepared_folder_only_with_each_other():
    from unike.editing import prepare_owners

    spec, base = "unike.method.editor:UniKE", {"memory_size": 5000, "top_k": 40}
    methods = {"unike": {"editor": spec, "hparams": base},
               "unike-intrin+latent-ike-k8": {"editor": spec, "hparams": {**base, "alpha": 0.5, "top_k": 8}},
               "unike-only-intrin": {"editor": spec, "hparams": {**base, "external": "none"}},
               "unike-intrin+ike": {"editor": spec, "hparams": {**base, "external": "ike", "zeta": "none"}},
               "unike-intrin+ike-k8": {"editor": spec, "hparams": {**base, "external": "ike", "ike_k": 8}},
               "unike-small-memory": {"editor": spec, "hparams": {**base, "memory_size": 100}}}
    assert prepare_owners(methods) == {"unike": "unike", "unike-intrin+latent-ike-k8": "unike",
                                       "unike-only-intrin": "unike",  # the same FFN memory, no bank
                                       "unike-intrin+ike": "unike-intrin+ike",
                                       "unike-intrin+ike-k8": "unike-intrin+ike",
                                       "unike-small-memory": "unike-small-memory"}
