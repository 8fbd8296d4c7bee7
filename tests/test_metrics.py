import pytest
import torch

from unike.metrics import agreement, exact_match, score_case, token_accuracy

T = torch.tensor


def test_token_accuracy_and_exact_match_hand_computed():
    assert token_accuracy(T([5, 7, 9, 2]), T([5, 7, 1, 2])) == 0.75
    assert exact_match(T([5, 7, 9, 2]), T([5, 7, 1, 2])) == 0.0
    assert exact_match(T([5, 7]), T([5, 7])) == 1.0


def test_locality_is_agreement_with_pre_edit_predictions_not_with_the_truth():
    # Pre-edit the model said [3, 4, 4]; post-edit [3, 4, 8]: 2 of 3 positions unchanged.
    assert agreement(T([3, 4, 8]), T([3, 4, 4])) == pytest.approx(2 / 3)


def test_score_case_combines_rows():
    preds = {"rel": T([1, 2]), "t_gen": T([1, 0]), "m_gen": T([0, 0]), "t_loc": T([4, 4, 4, 4]), "m_loc": T([6])}
    targets = {"rel": T([1, 2]), "t_gen": T([1, 2]), "m_gen": T([1, 2]), "t_loc": T([9, 9, 9, 9]), "m_loc": T([6])}
    pre = {"t_loc": T([4, 4, 5, 4]), "m_loc": T([7])}
    s = score_case(preds, targets, pre)
    assert s == {"rel": 1.0, "rel_em": 1.0, "t_gen": 0.5, "t_gen_em": 0.0, "m_gen": 0.0, "m_gen_em": 0.0,
                 "t_loc": 0.75, "m_loc": 0.0}


def test_empty_answer_and_length_change_are_errors():
    with pytest.raises(ValueError, match="no answer tokens"):
        token_accuracy(T([], dtype=torch.long), T([], dtype=torch.long))
    with pytest.raises(ValueError, match="changed length"):
        agreement(T([1, 2]), T([1]))
