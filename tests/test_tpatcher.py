"""T-Patcher and the shared key-value neurons, on untrained tiny backbones."""

import pytest
import torch

from baselines.tpatcher import AmplifiedNeurons, TPatcher, TPatcherHparams
from unike.data import case_samples, edit_sample
from unike.neurons import (FFNPatcher, KeyValueNeurons, ffn_inputs, key_init, memory_columns, memory_loss,
                           top_k_indices)


def _logits(backbone, case):
    return backbone.logits(backbone.encode(case_samples(case)))


def test_neurons_with_zero_values_change_nothing(backbone, vqa_cases):
    before = _logits(backbone, vqa_cases[0])
    patcher = FFNPatcher(backbone)
    d = backbone.model.config.text_config.hidden_size
    patcher.add(len(backbone.text) - 1, KeyValueNeurons(torch.randn(3, d)))  # values start at zero
    assert torch.equal(_logits(backbone, vqa_cases[0]), before)
    patcher.clear()


def test_key_init_fires_exactly_on_its_token(backbone, vqa_cases):
    batch = backbone.encode([edit_sample(vqa_cases[0])])
    inputs, _ = ffn_inputs(backbone, batch, [0])
    x = inputs[0][0]
    neurons = KeyValueNeurons(key_init(x[-3:]))
    torch.testing.assert_close(neurons.pre_activation(x[-3:]).diagonal(), torch.ones(3))


def test_amplified_values_start_silent_and_move_value_scale_times_lr_while_keys_wait():
    # The authors' amplify_v: value = v_raw * a, a starting at 10. Under Adam a first step
    # moves every parameter with a gradient by lr, so the values move by lr * 10.
    torch.manual_seed(0)
    keys = torch.randn(2, 8)
    neurons = AmplifiedNeurons(key_init(keys), scale=10.0)
    assert torch.equal(neurons.value_vectors(), torch.zeros(2, 8))  # a new patch changes nothing yet
    before = neurons.keys.detach().clone()
    opt = torch.optim.Adam(neurons.parameters(), lr=1e-2)
    loss = (neurons(keys) - torch.ones(8)).pow(2).sum()  # each neuron fires (1) on its own input
    loss.backward()
    opt.step()
    torch.testing.assert_close(neurons.value_vectors().abs(), torch.full((2, 8), 0.1), rtol=1e-4, atol=0)
    # Values at zero pass no gradient to the keys: the first step shapes the values alone.
    assert torch.equal(neurons.keys.detach(), before)


def test_memory_loss_is_t_patchers_over_each_neurons_k_hardest_memory_inputs():
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(40, 6, generator=g)  # 40 FFN inputs (rows)
    neurons = KeyValueNeurons(torch.randn(3, 6, generator=g))
    with torch.no_grad():
        neurons.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    s_own = torch.tensor([1.0, 2.0, 0.0])
    expected = 0.0
    keys, bias = neurons.keys.detach(), neurons.bias.detach()
    for j in range(3):  # by hand: neuron j's 5 largest pre-activations over the rows
        a = sorted((float(memory[i] @ keys[j] + bias[j]) for i in range(40)), reverse=True)[:5]
        expected += sum(torch.exp(torch.tensor(x - float(s_own[j]) + 3.0)) + torch.exp(torch.tensor(x + 3.0))
                        for x in a) / 15
    loss = memory_loss(neurons, s_own, memory_columns(memory), top_k=5)
    assert torch.allclose(loss, torch.as_tensor(expected, dtype=loss.dtype), rtol=1e-5)
    loss.backward()  # only the top-5 inputs of each neuron pull on its key
    top = (memory @ keys.T + bias).topk(5, dim=0).indices
    for j in range(3):
        grad_by_hand = sum(memory[i] * float(torch.exp(memory[i] @ keys[j] + bias[j] + 3)
                                             * (torch.exp(-s_own[j]) + 1) / 15) for i in top[:, j])
        assert torch.allclose(neurons.keys.grad[j], grad_by_hand, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_indices_are_each_rows_k_largest(dtype):
    x = torch.randn(7, 300, generator=torch.Generator().manual_seed(1)).to(dtype)
    picked = top_k_indices(x, 20)
    assert picked.shape == (7, 20)
    for row, idx in zip(x, picked):
        assert set(idx.tolist()) == set(row.topk(20).indices.tolist())
    assert top_k_indices(x, 500).shape == (7, 300)  # k above the row length: every entry


def test_tpatcher_fixes_the_edit_keeps_memory_silent_and_restores_exactly(backbone, vqa_cases, tmp_path):
    hp = TPatcherHparams(max_steps=300)
    TPatcher.prepare(backbone, hp, vqa_cases[2:], tmp_path, seed=0)
    weights = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    untouched = _logits(backbone, vqa_cases[3])
    editor = TPatcher(backbone, {"max_steps": 300}, tmp_path)
    case = vqa_cases[0]
    (pred,), (target,) = editor.predict([edit_sample(case)])
    assert not torch.equal(pred, target)
    editor.edit(case)
    (pred,), (target,) = editor.predict([edit_sample(case)])
    assert torch.equal(pred, target)
    assert len(editor.patcher.neurons[len(backbone.text) - 1]) == 1
    # The memory grew by the edit's own inputs, so a second patch must not fire there.
    assert editor.memory.shape[1] > editor.base_memory.shape[1]
    editor.edit(vqa_cases[1])
    assert len(editor.patcher.neurons[len(backbone.text) - 1]) == 2  # patches accumulate
    editor.restore()
    assert not editor.patcher.neurons and torch.equal(editor.memory, editor.base_memory)
    assert all(torch.equal(weights[k], v) for k, v in backbone.model.state_dict().items())
    assert torch.equal(_logits(backbone, vqa_cases[3]), untouched)
