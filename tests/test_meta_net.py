from __future__ import annotations

import math

import pytest
import torch

from mlc_text.meta_net import LabelCorrector, normalise_skip_connection, warm_start_corrector


@pytest.mark.parametrize("skip_connection", ["none", "global", "per_example"])
def test_corrected_labels_are_distributions(skip_connection):
    torch.manual_seed(0)
    corrector = LabelCorrector(4, 8, hidden_size=16, label_embedding_size=4, skip_connection=skip_connection)
    corrected = corrector(torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 0]))
    assert corrected.shape == (5, 4)
    torch.testing.assert_close(corrected.sum(-1), torch.ones(5))
    assert (corrected >= 0).all()


def test_per_example_skip_is_the_sigmoid_of_an_extra_unit():
    torch.manual_seed(0)
    corrector = LabelCorrector(
        3, 8, hidden_size=16, label_embedding_size=4, skip_connection="per_example", skip_init=2.0
    )
    assert corrector.mlp[-1].out_features == 4 and corrector.mlp[-1].bias[-1].item() == 2.0
    features, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    hidden = torch.cat([features, corrector.label_embedding(labels)], dim=-1)
    logits = corrector.mlp(hidden)
    mix = torch.sigmoid(logits[:, 3:])
    expected = (1 - mix) * torch.softmax(logits[:, :3], -1) + mix * torch.nn.functional.one_hot(labels, 3)
    torch.testing.assert_close(corrector(features, labels), expected)
    assert corrector.last_skip_weight.item() == pytest.approx(mix.mean().item())
    # each row its own weight, starting near sigmoid(2) = 0.88 (the other units' weights move it a little)
    assert mix.std() > 0 and abs(mix.mean().item() - 1 / (1 + math.exp(-2))) < 0.1


@pytest.mark.parametrize(
    "value, expected", [(True, "global"), (False, "none"), ("true", "global"), ("per_example", "per_example")]
)
def test_skip_connection_aliases(value, expected):
    assert normalise_skip_connection(value) == expected
    with pytest.raises(ValueError, match="skip_connection must be one of none, global, per_example"):
        normalise_skip_connection("always")


def test_a_saved_corrector_keeps_its_skip_connection(tmp_path):
    corrector = LabelCorrector(3, 8, hidden_size=16, label_embedding_size=4, skip_connection="per_example")
    corrector.save_pretrained(tmp_path)
    loaded = LabelCorrector.from_pretrained(tmp_path)
    assert loaded.skip_connection == "per_example"
    features, labels = torch.randn(2, 8), torch.tensor([0, 2])
    torch.testing.assert_close(loaded(features, labels), corrector(features, labels))


def test_warm_start_teaches_to_keep_a_label_the_features_agree_with_and_replace_one_they_contradict():
    torch.manual_seed(0)
    centres = torch.randn(3, 8) * 3
    labels = torch.arange(3).repeat(10)
    features = centres[labels] + 0.3 * torch.randn(30, 8)
    corrector = LabelCorrector(3, 8, hidden_size=32, label_embedding_size=4, skip_connection="per_example")
    losses = warm_start_corrector(corrector, features, labels, steps=200, learning_rate=1e-2, seed=0)
    assert losses[-1] < 0.2 * losses[0]
    with torch.no_grad():
        kept = corrector(features, labels).argmax(-1)
        replaced = corrector(features, (labels + 1) % 3).argmax(-1)
    assert (kept == labels).float().mean() > 0.9 and (replaced == labels).float().mean() > 0.9


def test_anchored_corrector_blends_in_the_given_label_and_passes_the_meta_gradient_scaled():
    from mlc_text.meta_net import AnchoredCorrector

    torch.manual_seed(0)
    corrector = LabelCorrector(3, 8, hidden_size=16, label_embedding_size=4)
    anchored = AnchoredCorrector(corrector, trust=0.75)
    assert list(anchored.parameters()) == list(corrector.parameters())
    features, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    plain = corrector(features, labels)
    blended = anchored(features, labels)
    torch.testing.assert_close(blended, 0.75 * torch.nn.functional.one_hot(labels, 3) + 0.25 * plain)
    upstream = torch.randn(4, 3)
    (grad_plain,) = torch.autograd.grad(plain, corrector.mlp[-1].bias, upstream)
    (grad_blended,) = torch.autograd.grad(anchored(features, labels), corrector.mlp[-1].bias, upstream)
    torch.testing.assert_close(grad_blended, 0.25 * grad_plain)
    anchored.trust = 0.0
    torch.testing.assert_close(anchored(features, labels), plain)


def test_main_net_teacher_starts_at_the_main_nets_prediction_blended_with_the_given_label():
    torch.manual_seed(0)
    corrector = LabelCorrector(
        3, 8, hidden_size=16, label_embedding_size=4, skip_connection="per_example", skip_init=2.0, teacher="main_net"
    )
    features, labels, main_logits = torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1]), torch.randn(5, 3)
    hidden = torch.cat([features, corrector.label_embedding(labels)], dim=-1)
    mix = torch.sigmoid(corrector.mlp(hidden)[:, 3:])
    expected = mix * torch.nn.functional.one_hot(labels, 3) + (1 - mix) * torch.softmax(main_logits, -1)
    torch.testing.assert_close(corrector(features, labels, main_logits=main_logits), expected)
    with pytest.raises(ValueError, match="teacher='main_net' needs the main net's logits"):
        corrector(features, labels)


def test_main_net_teacher_adds_the_mlps_logits_and_sends_no_gradient_to_the_main_net():
    torch.manual_seed(0)
    corrector = LabelCorrector(3, 8, hidden_size=16, label_embedding_size=4, teacher="main_net")
    with torch.no_grad():
        corrector.mlp[-1].weight.normal_()  # as after some meta steps
    features, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    main_logits = torch.randn(4, 3, requires_grad=True)
    hidden = torch.cat([features, corrector.label_embedding(labels)], dim=-1)
    expected = torch.softmax(corrector.mlp(hidden) + main_logits.detach(), -1)
    corrected = corrector(features, labels, main_logits=main_logits)
    torch.testing.assert_close(corrected, expected)
    assert not torch.allclose(corrected, torch.softmax(main_logits.detach(), -1))
    assert corrected.grad_fn is not None and main_logits.grad is None
    corrected.sum().backward()
    assert main_logits.grad is None and corrector.mlp[-1].weight.grad is not None


def test_correct_passes_main_logits_only_to_a_corrector_that_reads_them():
    from mlc_text.meta_net import AnchoredCorrector, correct

    torch.manual_seed(0)
    features, labels, main_logits = torch.randn(4, 8), torch.tensor([0, 1, 2, 1]), torch.randn(4, 3)
    plain = LabelCorrector(3, 8, hidden_size=16, label_embedding_size=4)
    torch.testing.assert_close(correct(plain, features, labels, main_logits), plain(features, labels))
    taught = AnchoredCorrector(LabelCorrector(3, 8, hidden_size=16, label_embedding_size=4, teacher="main_net"))
    assert taught.reads_main_logits
    torch.testing.assert_close(correct(taught, features, labels, main_logits), torch.softmax(main_logits, -1))
    with pytest.raises(ValueError, match="teacher must be one of none, main_net, got 'self'"):
        LabelCorrector(3, 8, teacher="self")


def test_a_saved_corrector_keeps_its_teacher(tmp_path):
    LabelCorrector(3, 8, hidden_size=16, label_embedding_size=4, teacher="main_net").save_pretrained(tmp_path)
    assert LabelCorrector.from_pretrained(tmp_path).reads_main_logits


def test_given_label_confidence_is_the_standardised_log_probability_of_the_given_label():
    from mlc_text.meta_net import given_label_confidence

    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -1.0]]), torch.tensor([0, 0, 1, 1])
    log_prob = torch.log_softmax(logits, -1)[torch.arange(4), labels]
    expected = (log_prob - log_prob.mean()) / log_prob.std()
    torch.testing.assert_close(given_label_confidence(logits, labels), expected, atol=1e-5, rtol=1e-5)
    assert given_label_confidence(logits, labels)[0] > 0 > given_label_confidence(logits, labels)[3]
    torch.testing.assert_close(given_label_confidence(logits[:1], labels[:1]), torch.zeros(1))


def test_confidence_gate_starts_as_the_plain_per_row_gate_and_adds_slope_times_confidence():
    from mlc_text.meta_net import given_label_confidence

    features, labels, main_logits = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(6, 3)
    correctors = {}
    for gate in (False, True):
        torch.manual_seed(0)
        correctors[gate] = LabelCorrector(
            3,
            8,
            hidden_size=16,
            label_embedding_size=4,
            skip_connection="per_example",
            skip_init=2.0,
            confidence_gate=gate,
        )
    plain, gated = correctors[False], correctors[True]
    assert gated.reads_main_logits and not plain.reads_main_logits
    torch.testing.assert_close(gated(features, labels, main_logits=main_logits), plain(features, labels))
    with torch.no_grad():
        gated.confidence_slope.fill_(1.5)
    hidden = torch.cat([features, gated.label_embedding(labels)], dim=-1)
    raw = gated.mlp(hidden)
    mix = torch.sigmoid(raw[:, 3:] + 1.5 * given_label_confidence(main_logits, labels)[:, None])
    expected = mix * torch.nn.functional.one_hot(labels, 3) + (1 - mix) * torch.softmax(raw[:, :3], -1)
    torch.testing.assert_close(gated(features, labels, main_logits=main_logits), expected)
    with pytest.raises(ValueError, match="confidence_gate needs the main net's logits"):
        gated(features, labels)
    with pytest.raises(ValueError, match="confidence_gate needs skip_connection='per_example', got 'global'"):
        LabelCorrector(3, 8, skip_connection="global", confidence_gate=True)


def test_a_push_common_to_every_row_does_not_move_the_confidence_slope():
    # Every row's gate at the same value and the same upstream gradient on its trust: the slope's gradient is the
    # sum of that gradient times a confidence that sums to zero over the batch, so zero; a row-level signal moves it.
    torch.manual_seed(0)
    corrector = LabelCorrector(
        2,
        8,
        hidden_size=16,
        label_embedding_size=4,
        skip_connection="per_example",
        skip_init=2.0,
        confidence_gate=True,
    )
    with torch.no_grad():
        corrector.mlp[-1].weight.zero_()  # every row's gate logit = skip_init, its class distribution uniform
    features, labels, main_logits = torch.randn(8, 8), torch.tensor([0, 1] * 4), torch.randn(8, 2)
    onehot = torch.nn.functional.one_hot(labels, 2).float()
    corrected = corrector(features, labels, main_logits=main_logits)
    (common,) = torch.autograd.grad(corrected, corrector.confidence_slope, onehot)  # the same push on every row
    assert abs(common.item()) < 1e-6
    trust_more_where_confident = onehot * given_label_confidence_sign(main_logits, labels)[:, None]
    (row_level,) = torch.autograd.grad(
        corrector(features, labels, main_logits=main_logits), corrector.confidence_slope, trust_more_where_confident
    )
    assert row_level.item() > 1e-3


def given_label_confidence_sign(main_logits, labels):
    from mlc_text.meta_net import given_label_confidence

    return torch.sign(given_label_confidence(main_logits, labels))
