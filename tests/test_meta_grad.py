from __future__ import annotations

import copy

import pytest
import torch

from mlc_text.clean_batches import join_inputs
from mlc_text.meta_grad import (
    LookaheadBuffer,
    LossScale,
    MetaBatch,
    _main_loss_and_grads,
    check_optimizer,
    clip_coefficient,
    corrected_label_step,
    discount_factor,
    loss_and_grads,
    meta_step,
    resolve_meta_gradient,
    soft_cross_entropy,
    trainable_parameters,
    unit_norm,
    virtual_step,
)
from mlc_text.meta_net import LabelCorrector, capture_head_features, correct, find_head_module

from .conftest import random_inputs, tiny_bert

NUM_LABELS = 3


def make_setup(
    optimizer_name="sgd",
    dtype=torch.float64,
    skip_connection=False,
    dropout=0.0,
    seed=0,
    attn_implementation="eager",
    teacher="none",
    confidence_gate=False,
):
    model = tiny_bert(NUM_LABELS, seed=seed, dropout=dropout, attn_implementation=attn_implementation)
    model = model.to(dtype).train()
    torch.manual_seed(seed + 1)
    corrector = LabelCorrector(
        NUM_LABELS,
        32,
        hidden_size=16,
        label_embedding_size=8,
        skip_connection=skip_connection,
        teacher=teacher,
        confidence_gate=confidence_gate,
    )
    if confidence_gate:  # as after some meta steps: the slope no longer zero
        with torch.no_grad():
            corrector.confidence_slope.fill_(0.7)
    if teacher != "none":  # as after some meta steps: the MLP's own class outputs no longer zero
        with torch.no_grad():
            corrector.mlp[-1].weight.normal_(std=0.3)
    corrector = corrector.to(dtype)
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01, nesterov=True)
    elif optimizer_name == "sgd_dampened":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, dampening=0.3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    # Give the optimizer a state (momentum buffer / Adam moments), as mid-training.
    inputs = random_inputs(6, seed=seed + 7)
    loss = torch.nn.functional.cross_entropy(model(**inputs).logits, torch.arange(6) % NUM_LABELS)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    generator = torch.Generator().manual_seed(seed + 3)
    batch = MetaBatch(
        noisy_inputs=random_inputs(6, seed=seed + 11),
        noisy_labels=torch.randint(0, NUM_LABELS, (6,), generator=generator),
        clean_inputs=random_inputs(5, seed=seed + 13),
        clean_labels=torch.randint(0, NUM_LABELS, (5,), generator=generator),
    )
    return model, corrector, optimizer, batch


def relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    actual_flat = torch.cat([t.flatten() for t in actual])
    expected_flat = torch.cat([t.flatten() for t in expected])
    return ((actual_flat - expected_flat).norm() / expected_flat.norm()).item()


def clean_loss_after_virtual_step(model, corrector, optimizer, batch, clean_in_main_loss=True, clip=1.0):
    """
    d(clean loss at w'(a))/da is what the meta-gradient must equal: this is that loss as a function of `a`. `clip`:
    a gradient-clipping factor, held constant as the virtual step holds it. The loss at w' is on the batch's meta
    rows when it has them, else on its clean rows.
    """
    params = trainable_parameters(model)
    head = find_head_module(model)
    with capture_head_features(head) as store:
        logits = model(**batch.noisy_inputs).logits
    corrected = correct(corrector, store["features"], batch.noisy_labels, logits)
    num_noisy, num_clean = len(batch.noisy_labels), len(batch.clean_labels)
    loss = soft_cross_entropy(logits, corrected)
    if clean_in_main_loss:
        clean = torch.nn.functional.cross_entropy(model(**batch.clean_inputs).logits, batch.clean_labels)
        loss = (num_noisy * loss + num_clean * clean) / (num_noisy + num_clean)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    virtual_params, _ = virtual_step(params, {name: clip * grad for name, grad in grads.items()}, optimizer)
    meta_inputs = batch.clean_inputs if batch.meta_inputs is None else batch.meta_inputs
    meta_labels = batch.clean_labels if batch.meta_labels is None else batch.meta_labels
    logits = torch.func.functional_call(model, virtual_params, args=(), kwargs=meta_inputs).logits
    return torch.nn.functional.cross_entropy(logits, meta_labels)


def with_meta_rows(batch: MetaBatch, seed: int = 17) -> MetaBatch:
    """The batch with 4 separate rows for the meta objective (as `meta_split` gives)."""
    generator = torch.Generator().manual_seed(seed)
    meta_labels = torch.randint(0, NUM_LABELS, (4,), generator=generator)
    return MetaBatch(
        batch.noisy_inputs,
        batch.noisy_labels,
        batch.clean_inputs,
        batch.clean_labels,
        random_inputs(4, seed=seed),
        meta_labels,
    )


@pytest.mark.parametrize(
    "optimizer_name,clean_in_main_loss,clipped,skip_connection,meta_rows,teacher",
    [
        ("sgd", True, False, "none", False, "none"),
        ("sgd", False, False, "none", False, "none"),
        ("sgd", True, True, "none", False, "none"),
        ("sgd_dampened", False, True, "none", False, "none"),
        ("sgd", True, False, "per_example", False, "none"),
        ("sgd", True, False, "none", True, "none"),
        ("sgd", True, True, "per_example", True, "none"),
        ("sgd", True, False, "per_example", False, "main_net"),
        ("sgd_dampened", False, True, "global", False, "main_net"),
    ],
)
def test_reference_matches_finite_differences(
    optimizer_name, clean_in_main_loss, clipped, skip_connection, meta_rows, teacher
):
    model, corrector, optimizer, batch = make_setup(optimizer_name, skip_connection=skip_connection, teacher=teacher)
    if meta_rows:
        batch = with_meta_rows(batch)
    head = find_head_module(model)
    max_grad_norm = None
    if clipped:  # a threshold well below the main gradient's norm, so that the virtual step clips
        unclipped = meta_step(model, corrector, head, batch, optimizer, clean_in_main_loss=clean_in_main_loss)
        norm = torch.sqrt(sum(g.square().sum() for g in unclipped.main_grads.values())).item()
        max_grad_norm = 0.3 * norm
    out = meta_step(
        model,
        corrector,
        head,
        batch,
        optimizer,
        meta_gradient="reference",
        clean_in_main_loss=clean_in_main_loss,
        max_grad_norm=max_grad_norm,
    )
    clip = clip_coefficient(out.main_grads, max_grad_norm)
    assert clip < 0.5 if clipped else clip == 1.0
    # Central differences along a random direction of the corrector's parameters.
    generator = torch.Generator().manual_seed(5)
    meta_params = list(corrector.parameters())
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in meta_params]
    epsilon = 1e-5
    values = []
    for sign in (1, -1):
        shifted = copy.deepcopy(corrector)
        with torch.no_grad():
            for p, d in zip(shifted.parameters(), direction):
                p.add_(sign * epsilon * d)
        values.append(
            clean_loss_after_virtual_step(model, shifted, optimizer, batch, clean_in_main_loss, clip=clip).item()
        )
    finite_difference = (values[0] - values[1]) / (2 * epsilon)
    analytic = sum((g * d).sum() for g, d in zip(out.meta_grads, direction)).item()
    assert abs(analytic) > 1e-8, "degenerate check: the meta-gradient along the direction is zero"
    assert abs(analytic - finite_difference) / abs(finite_difference) < 1e-4


@pytest.mark.parametrize("optimizer_name", ["sgd", "sgd_dampened", "adamw"])
@pytest.mark.parametrize("clean_in_main_loss", [True, False])
@pytest.mark.parametrize(
    "skip_connection,teacher,confidence_gate",
    [
        ("none", "none", False),
        ("global", "none", False),
        ("per_example", "none", False),
        ("per_example", "main_net", False),
        ("per_example", "none", True),
    ],
)
def test_jvp_matches_reference_float64(optimizer_name, clean_in_main_loss, skip_connection, teacher, confidence_gate):
    model, corrector, optimizer, batch = make_setup(
        optimizer_name, skip_connection=skip_connection, teacher=teacher, confidence_gate=confidence_gate
    )
    head = find_head_module(model)
    outputs = {
        path: meta_step(
            model, corrector, head, batch, optimizer, meta_gradient=path, clean_in_main_loss=clean_in_main_loss
        )
        for path in ("reference", "jvp")
    }
    assert relative_error(outputs["jvp"].meta_grads, outputs["reference"].meta_grads) < 1e-5
    for name, grad in outputs["reference"].main_grads.items():
        torch.testing.assert_close(outputs["jvp"].main_grads[name], grad)
    torch.testing.assert_close(outputs["jvp"].clean_loss, outputs["reference"].clean_loss)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_jvp_matches_reference_float32_with_dropout(optimizer_name, attn_implementation):
    # Dropout on: the fast path must replay the noisy forward's dropout masks in its forward-mode pass.
    # SDPA: its fused CPU kernel has no forward-mode derivative; the fast path must still work with it.
    model, corrector, optimizer, batch = make_setup(
        optimizer_name, dtype=torch.float32, dropout=0.1, attn_implementation=attn_implementation
    )
    head = find_head_module(model)
    outputs = {}
    for path in ("reference", "jvp"):
        torch.manual_seed(123)
        outputs[path] = meta_step(model, corrector, head, batch, optimizer, meta_gradient=path)
    assert relative_error(outputs["jvp"].meta_grads, outputs["reference"].meta_grads) < 1e-3


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("meta_rows", [False, True])
def test_jvp_matches_reference_with_meta_rows(optimizer_name, meta_rows):
    # The meta objective on rows the main loss never saw: both paths read the meta rows, not the clean batch.
    model, corrector, optimizer, batch = make_setup(optimizer_name, skip_connection="per_example")
    batch = with_meta_rows(batch) if meta_rows else batch
    head = find_head_module(model)
    outputs = {
        path: meta_step(model, corrector, head, batch, optimizer, meta_gradient=path) for path in ("reference", "jvp")
    }
    assert relative_error(outputs["jvp"].meta_grads, outputs["reference"].meta_grads) < 1e-5
    expected = clean_loss_after_virtual_step(model, corrector, optimizer, batch)
    torch.testing.assert_close(outputs["jvp"].clean_loss, expected.detach())


def test_meta_rows_change_the_objective_but_not_the_main_gradient():
    model, corrector, optimizer, batch = make_setup("adamw")
    head = find_head_module(model)
    plain = meta_step(model, corrector, head, batch, optimizer)
    split = meta_step(model, corrector, head, with_meta_rows(batch), optimizer)
    for name, grad in plain.main_grads.items():
        torch.testing.assert_close(split.main_grads[name], grad)
    assert relative_error(split.meta_grads, plain.meta_grads) > 1e-2
    with pytest.raises(ValueError, match="keep_clean_pass"):
        meta_step(model, corrector, head, with_meta_rows(batch), optimizer, keep_clean_pass=True)


# Stated accuracy of the finite-difference meta-gradient against the exact one (relative error of the whole vector).
FD_TOLERANCE = {
    (torch.float64, "fd"): 1e-6,
    (torch.float64, "fd_central"): 1e-7,
    (torch.float32, "fd"): 5e-3,
    (torch.float32, "fd_central"): 5e-4,
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", ["fd", "fd_central"])
@pytest.mark.parametrize("optimizer_name,teacher", [("sgd", "none"), ("adamw", "none"), ("adamw", "main_net")])
def test_finite_difference_matches_jvp(dtype, path, optimizer_name, teacher):
    # Dropout on in float32: the shifted forwards must draw the noisy forward's masks.
    dropout = 0.1 if dtype == torch.float32 else 0.0
    model, corrector, optimizer, batch = make_setup(optimizer_name, dtype=dtype, dropout=dropout, teacher=teacher)
    head = find_head_module(model)
    outputs = {}
    for name in ("jvp", path):
        torch.manual_seed(123)
        outputs[name] = meta_step(model, corrector, head, batch, optimizer, meta_gradient=name)
    error = relative_error(outputs[path].meta_grads, outputs["jvp"].meta_grads)
    assert error < FD_TOLERANCE[(dtype, path)], error
    for name, grad in outputs["jvp"].main_grads.items():
        torch.testing.assert_close(outputs[path].main_grads[name], grad)


def test_finite_difference_of_a_linear_map_is_exact():
    # Logits linear in the weights: the forward difference has no curvature term, only rounding.
    from mlc_text.meta_grad import logits_finite_difference

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 5, dtype=torch.float64))

        def forward(self, x):
            return type("Out", (), {"logits": x @ self.weight.T})()

    torch.manual_seed(0)
    model, inputs = Linear(), {"x": torch.randn(4, 5, dtype=torch.float64)}
    tangent = {"weight": torch.randn(3, 5, dtype=torch.float64)}
    params = dict(model.named_parameters())
    logits = model(**inputs).logits.detach()
    expected = inputs["x"] @ tangent["weight"].T
    for central in (False, True):
        actual = logits_finite_difference(model, params, inputs, tangent, logits, central=central)
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-9)
    zero = logits_finite_difference(model, params, inputs, {"weight": torch.zeros(3, 5, dtype=torch.float64)}, logits)
    assert torch.equal(zero, torch.zeros_like(zero))


def test_virtual_step_matches_real_optimizer_step():
    for name in ("sgd", "sgd_dampened", "adamw"):
        model, _, optimizer, batch = make_setup(name)
        params = trainable_parameters(model)
        _, grads = loss_and_grads(model, batch.clean_inputs, batch.clean_labels)
        virtual_params, _ = virtual_step(params, grads, optimizer)
        for param_name, param in params.items():
            param.grad = grads[param_name].clone()
        optimizer.step()
        for param_name, param in params.items():
            torch.testing.assert_close(virtual_params[param_name], param.detach(), msg=f"{name}: {param_name}")


@pytest.mark.parametrize("name", ["sgd", "sgd_dampened", "adamw"])
def test_virtual_step_with_clipping_matches_clipped_real_step(name):
    # The Trainer clips the gradient by its global norm before the real step; the virtual step must land on the same
    # weights, or w' is not the next step's w.
    model, _, optimizer, batch = make_setup(name)
    params = trainable_parameters(model)
    _, grads = loss_and_grads(model, batch.clean_inputs, batch.clean_labels)
    norm = torch.sqrt(sum(g.square().sum() for g in grads.values())).item()
    max_grad_norm = 0.25 * norm
    virtual_params, _ = virtual_step(params, grads, optimizer, max_grad_norm=max_grad_norm)
    unclipped, _ = virtual_step(params, grads, optimizer)
    for param_name, param in params.items():
        param.grad = grads[param_name].clone()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    moved = False
    for param_name, param in params.items():
        torch.testing.assert_close(virtual_params[param_name], param.detach(), msg=f"{name}: {param_name}")
        moved |= not torch.allclose(unclipped[param_name], param.detach())
    assert moved, "degenerate check: clipping changed nothing"


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("meta_gradient", ["jvp", "reference"])
def test_carried_clean_pass_is_the_clean_gradient_at_the_next_weights(optimizer_name, meta_gradient):
    # After the real (clipped) step, the clean pass a meta step made at w' is the clean batch's loss and gradient at
    # the new weights; a step that carries it computes what a step that runs that clean batch at w computes.
    model, corrector, optimizer, batch = make_setup(optimizer_name)
    head = find_head_module(model)
    max_grad_norm = 0.05
    first = meta_step(
        model,
        corrector,
        head,
        batch,
        optimizer,
        meta_gradient=meta_gradient,
        max_grad_norm=max_grad_norm,
        keep_clean_pass=True,
    )
    assert clip_coefficient(first.main_grads, max_grad_norm) < 1.0, "degenerate check: no clipping"
    params = trainable_parameters(model)
    for name, param in params.items():
        param.grad = first.main_grads[name].clone()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    clean_loss, clean_grads = loss_and_grads(model, batch.clean_inputs, batch.clean_labels)
    carried = first.clean_pass
    assert carried.num_rows == len(batch.clean_labels)
    torch.testing.assert_close(carried.loss, clean_loss)
    assert relative_error(list(carried.grads.values()), [clean_grads[n] for n in carried.grads]) < 1e-6

    # Next step: new noisy rows and a new clean batch for the meta objective; the main loss's clean term is the
    # previous clean batch, either run again at w or carried.
    following = make_setup(optimizer_name, seed=4)[3]
    previous_clean = MetaBatch(following.noisy_inputs, following.noisy_labels, batch.clean_inputs, batch.clean_labels)
    recomputed = meta_step(model, corrector, head, previous_clean, optimizer, meta_gradient=meta_gradient)
    with_carried = meta_step(
        model, corrector, head, previous_clean, optimizer, meta_gradient=meta_gradient, carried_clean_pass=carried
    )
    torch.testing.assert_close(with_carried.main_loss, recomputed.main_loss)
    assert relative_error(list(with_carried.main_grads.values()), list(recomputed.main_grads.values())) < 1e-6
    assert relative_error(with_carried.meta_grads, recomputed.meta_grads) < 1e-6


def test_virtual_step_uses_scheduled_learning_rate():
    model, _, optimizer, batch = make_setup("sgd")
    params = trainable_parameters(model)
    _, grads = loss_and_grads(model, batch.clean_inputs, batch.clean_labels)
    name = next(iter(params))
    lr_before = virtual_step(params, grads, optimizer)[1][name]  # L is computed when read: read it now
    for group in optimizer.param_groups:
        group["lr"] *= 0.5
    _, lr_after = virtual_step(params, grads, optimizer)
    assert lr_after[name] == pytest.approx(0.5 * lr_before)


def test_unsupported_optimizer_is_rejected():
    model = tiny_bert(NUM_LABELS)
    with pytest.raises(ValueError, match="Adagrad"):
        check_optimizer(torch.optim.Adagrad(model.parameters()))
    with pytest.raises(ValueError, match="maximize"):
        check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, maximize=True))


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_lookahead_three_steps_jvp_matches_reference(optimizer_name):
    # gradient_steps = 3: run three meta steps (with real main steps between) down both paths.
    totals = {}
    for path in ("reference", "jvp"):
        model, corrector, optimizer, batch = make_setup(optimizer_name)
        head = find_head_module(model)
        buffer = LookaheadBuffer(3)
        for _ in range(3):
            out = meta_step(model, corrector, head, batch, optimizer, meta_gradient=path, lookahead=buffer)
            total = buffer.accumulate(out.meta_grads, out.gamma)
            for name, param in trainable_parameters(model).items():
                param.grad = out.main_grads[name]
            optimizer.step()
        assert buffer.should_step and out.gamma is not None
        totals[path] = total
    assert relative_error(totals["jvp"], totals["reference"]) < 1e-5


@pytest.mark.parametrize("meta_gradient", ["reference", "jvp"])
@pytest.mark.parametrize("optimizer_name,keep_clean_pass", [("sgd", False), ("adamw", False), ("adamw", True)])
def test_meta_step_discount_is_gamma_of_the_clean_gradients(optimizer_name, keep_clean_pass, meta_gradient):
    # gamma from g (clean gradient at w), g' (at w') and L, each computed here on its own.
    model, corrector, optimizer, batch = make_setup(optimizer_name)
    head = find_head_module(model)
    buffer = LookaheadBuffer(2)
    buffer.accumulate([torch.zeros_like(p) for p in corrector.parameters()], None)  # a window is open
    options = {"meta_gradient": meta_gradient, "lookahead": buffer, "keep_clean_pass": keep_clean_pass}
    out = meta_step(model, corrector, head, batch, optimizer, **options)
    params = trainable_parameters(model)
    _, clean_grads = loss_and_grads(model, batch.clean_inputs, batch.clean_labels)
    virtual_params, virtual_lr = virtual_step(params, out.main_grads, optimizer)
    _, clean_grads_virtual = loss_and_grads(model, batch.clean_inputs, batch.clean_labels, params=virtual_params)
    expected = discount_factor(clean_grads, clean_grads_virtual, virtual_lr)
    assert out.gamma is not None and abs(expected.item()) > 1e-6
    torch.testing.assert_close(out.gamma, expected)


def test_discount_factor_formula():
    grads = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([2.0])}
    virtual_grads = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([1.0])}
    lr = {"a": 0.5, "b": torch.tensor([0.25])}
    # ((1-0.5)*3*1 + (1-0.25)*1*2) / (1 + 4)
    assert discount_factor(grads, virtual_grads, lr).item() == pytest.approx((1.5 + 1.5) / 5)


def test_lookahead_buffer_accumulates_and_resets():
    buffer = LookaheadBuffer(2)
    assert not buffer.needs_discount
    first = buffer.accumulate([torch.tensor([1.0])], None)
    assert not buffer.should_step and buffer.needs_discount
    second = buffer.accumulate([torch.tensor([2.0])], 0.5)
    assert buffer.should_step and not buffer.needs_discount
    assert first[0].item() == 1.0 and second[0].item() == 2.5
    with pytest.raises(ValueError, match="gradient_steps must be >= 1, got 0"):
        LookaheadBuffer(0)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_l2rw_weights_match_literal_double_backward(optimizer_name):
    from mlc_text.meta_grad import l2rw_weights

    model, _, optimizer, batch = make_setup(optimizer_name)
    weights, _ = l2rw_weights(model, batch, optimizer)
    # Literal L2RW: eps = 0 requires grad, w'(eps) through a create_graph backward, then d L_clean(w') / d eps.
    params = trainable_parameters(model)
    eps = torch.zeros(len(batch.noisy_labels), dtype=torch.float64, requires_grad=True)
    logits = model(**batch.noisy_inputs).logits
    losses = torch.nn.functional.cross_entropy(logits, batch.noisy_labels, reduction="none")
    grads = torch.autograd.grad((eps * losses).sum(), list(params.values()), create_graph=True)
    virtual_params, _ = virtual_step(params, dict(zip(params, grads)), optimizer)
    clean_logits = torch.func.functional_call(model, virtual_params, args=(), kwargs=batch.clean_inputs).logits
    clean_loss = torch.nn.functional.cross_entropy(clean_logits, batch.clean_labels)
    (eps_grad,) = torch.autograd.grad(clean_loss, eps)
    raw = (-eps_grad).clamp_min(0)
    assert raw.sum() > 0 and (raw == 0).sum() < len(raw), "degenerate check: all or no weights positive"
    torch.testing.assert_close(weights, raw / raw.sum())


def test_adam_rates_are_the_preconditioner_of_the_real_step():
    # L for AdamW: lr (1 - beta1) / (bias_correction1 (sqrt(v_new / bias_correction2) + eps)), with v_new the second
    # moment the real step then stores, times the clip factor.
    model, _, optimizer, batch = make_setup("adamw")
    params = trainable_parameters(model)
    _, grads = loss_and_grads(model, batch.clean_inputs, batch.clean_labels)
    max_grad_norm = 0.5 * torch.sqrt(sum(g.square().sum() for g in grads.values())).item()
    _, rates = virtual_step(params, grads, optimizer, max_grad_norm=max_grad_norm)
    coef = clip_coefficient(grads, max_grad_norm)
    read = {name: rates[name].clone() for name in params}  # before the real step changes the state
    for name, param in params.items():
        param.grad = grads[name].clone()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    group = optimizer.param_groups[0]
    (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
    for name, param in params.items():
        state = optimizer.state[param]
        step = float(state["step"])
        denom = state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5 + eps
        expected = coef * lr * (1 - beta1) / ((1 - beta1**step) * denom)
        torch.testing.assert_close(read[name], expected, msg=name)


def make_optimizer(model, name):
    """The optimizers the multi-tensor virtual step must mirror, with a state as mid-training (or none: `fresh`)."""
    if name in ("sgd", "sgd_dampened", "adamw"):
        return None  # make_setup's own
    params = list(model.parameters())
    if name == "sgd_plain":
        return torch.optim.SGD(params, lr=0.5)
    if name == "adam_amsgrad_l2":  # Adam's L2 decay enters the gradient; amsgrad keeps the running maximum
        return torch.optim.Adam(params, lr=1e-2, weight_decay=0.01, amsgrad=True)
    if name == "adamw_two_groups":  # as the Trainer builds it: no decay on biases and LayerNorm weights
        decay = [param for param in params if param.dim() > 1]
        rest = [param for param in params if param.dim() <= 1]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}])
    raise ValueError(name)


@pytest.mark.parametrize(
    "optimizer_name", ["sgd", "sgd_dampened", "sgd_plain", "adamw", "adam_amsgrad_l2", "adamw_two_groups"]
)
@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("clipped", [False, True])
def test_multi_tensor_virtual_step_equals_the_per_tensor_one(optimizer_name, fresh, clipped):
    # The multi-tensor ops compute the per-tensor arithmetic with products folded into fused adds: w', L, v = L g'
    # and gamma's terms agree to a few float64 roundings (up to 1e-13 relative where w' or Adam's L2-decayed
    # gradient cancels to near zero).
    from mlc_text.virtual_step import _chunks, scaled_direction

    model, _, optimizer, batch = make_setup("adamw" if optimizer_name.startswith("adam") else optimizer_name)
    optimizer = make_optimizer(model, optimizer_name) or optimizer
    params = trainable_parameters(model)
    if not fresh:  # a state, as mid-training (`fresh`: the first step, no state yet)
        _, grads = loss_and_grads(model, batch.noisy_inputs, batch.noisy_labels)
        for name, param in params.items():
            param.grad = grads[name]
        optimizer.step()
        optimizer.zero_grad()
    assert len(_chunks(optimizer, params, {id(p): g for g in optimizer.param_groups for p in g["params"]})) > 1
    _, grads = loss_and_grads(model, batch.clean_inputs, batch.clean_labels)
    norm = torch.sqrt(sum(g.square().sum() for g in grads.values())).item()
    max_grad_norm = 0.3 * norm if clipped else None
    per_tensor, rates = virtual_step(params, grads, optimizer, max_grad_norm, foreach=False)
    multi_tensor, chunked_rates = virtual_step(params, grads, optimizer, max_grad_norm, foreach=True)
    assert list(multi_tensor) == list(per_tensor)
    for name in params:
        torch.testing.assert_close(multi_tensor[name], per_tensor[name], rtol=1e-12, atol=1e-15, msg=name)
    read = dict(rates)
    for names, factor, denominators in chunked_rates.chunks():
        for index, name in enumerate(names):
            if denominators is None:  # SGD: one rate per param group
                assert factor == read[name]
            else:
                torch.testing.assert_close(factor / denominators[index], read[name], rtol=1e-12, atol=1e-15, msg=name)

    # v = L g' and the look-ahead discount's terms, against the per-tensor loop they replace.
    _, clean_grads_virtual = loss_and_grads(model, batch.clean_inputs, batch.clean_labels, params=per_tensor)
    _, clean_grads = loss_and_grads(model, batch.noisy_inputs, batch.noisy_labels)
    expected = {name: read[name] * grad for name, grad in clean_grads_virtual.items()}
    gamma = discount_factor(clean_grads, clean_grads_virtual, read)
    direction, numerator, norm_sq = scaled_direction(
        clean_grads_virtual, rates, in_place=False, clean_grads=clean_grads
    )
    torch.testing.assert_close(numerator / norm_sq, gamma, rtol=1e-13, atol=0)
    assert clean_grads == {}, "the clean gradient at w is dropped as it is read"
    for name in params:
        torch.testing.assert_close(direction[name], expected[name], rtol=1e-12, atol=1e-15, msg=name)
    in_place, _, _ = scaled_direction(clean_grads_virtual, rates)
    assert all(in_place[name] is clean_grads_virtual[name] for name in params)  # v formed in g', no copy
    for name in params:
        torch.testing.assert_close(in_place[name], expected[name], rtol=1e-12, atol=1e-15, msg=name)


def test_virtual_step_carrying_a_graph_takes_the_per_tensor_path():
    # The literal double backward differentiates through w'; L stays constant (no graph through Adam's denominator).
    model, _, optimizer, batch = make_setup("adamw")
    params = trainable_parameters(model)
    logits = model(**batch.clean_inputs).logits
    loss = torch.nn.functional.cross_entropy(logits, batch.clean_labels)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=True)))
    virtual_params, _ = virtual_step(params, grads, optimizer)
    expected, _ = virtual_step(params, grads, optimizer, foreach=True)
    for name in params:
        assert virtual_params[name].requires_grad
        torch.testing.assert_close(virtual_params[name], expected[name], rtol=1e-12, atol=1e-15)


def test_a_used_carried_clean_pass_is_consumed():
    # Its gradient is added into the main gradient; emptied then, it is not held through the rest of the step.
    model, corrector, optimizer, batch = make_setup("adamw")
    head = find_head_module(model)
    first = meta_step(model, corrector, head, batch, optimizer, keep_clean_pass=True)
    carried = first.clean_pass
    meta_step(model, corrector, head, batch, optimizer, carried_clean_pass=carried)
    assert carried.grads == {}
    unused = meta_step(model, corrector, head, batch, optimizer, keep_clean_pass=True).clean_pass
    meta_step(model, corrector, head, batch, optimizer, carried_clean_pass=unused, clean_in_main_loss=False)
    assert len(unused.grads) == len(trainable_parameters(model))  # not used: left as it was


def test_auto_meta_gradient_is_the_forward_difference_in_float32_and_jvp_under_half_precision():
    assert resolve_meta_gradient("auto", "no") == resolve_meta_gradient("auto", None) == "fd"
    assert resolve_meta_gradient("auto", "bf16") == resolve_meta_gradient("auto", "fp16") == "jvp"
    for name in ("jvp", "fd", "fd_central", "reference"):  # a named path is taken whatever the precision
        assert resolve_meta_gradient(name, "bf16") == resolve_meta_gradient(name, "no") == name
    with pytest.raises(ValueError, match="auto, jvp, fd, fd_central, reference, got 'exact'"):
        resolve_meta_gradient("exact", "no")


def test_unit_norm_keeps_the_direction_of_the_meta_gradient():
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0], [4.0]])]
    unit = unit_norm(grads)
    torch.testing.assert_close(unit[0], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(unit[1], torch.tensor([[0.0], [0.8]]))
    assert unit[1].shape == (2, 1)
    # scale-free: a meta-gradient 1e6 times smaller (a fitted clean set) gives the same direction
    torch.testing.assert_close(unit_norm([grad * 1e-6 for grad in grads])[0], unit[0])
    zeros = unit_norm([torch.zeros(3)])[0]
    assert torch.equal(zeros, torch.zeros(3))  # no NaN from a zero meta-gradient


def test_join_inputs_right_pads_the_shorter_batch():
    first = {"input_ids": torch.tensor([[7, 8, 9]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    second = {"input_ids": torch.tensor([[5], [6]]), "attention_mask": torch.tensor([[1], [1]])}
    joined = join_inputs(first, second, pad_token_id=3)
    assert joined["input_ids"].tolist() == [[7, 8, 9], [5, 3, 3], [6, 3, 3]]
    assert joined["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    with pytest.raises(ValueError, match=r"different inputs: \['attention_mask', 'input_ids'\] and \['input_ids'\]"):
        join_inputs(first, {"input_ids": second["input_ids"]})


@pytest.mark.parametrize(
    "attn_implementation,scaled,teacher",
    [("eager", False, "none"), ("eager", True, "none"), ("sdpa", False, "none"), ("sdpa", True, "none")]
    + [("sdpa", False, "main_net")],
)
def test_a_step_without_meta_update_runs_noisy_and_clean_rows_as_one_batch(attn_implementation, scaled, teacher):
    # One forward/backward over the joined rows gives the main loss and gradient of the two separate passes, also
    # when the clean batch is shorter (padded to the noisy one's length), under loss scaling, and with a corrector
    # that reads the noisy rows' logits.
    model, corrector, _, batch = make_setup("adamw", attn_implementation=attn_implementation, teacher=teacher)
    batch.clean_inputs = random_inputs(5, length=6, seed=13)
    head = find_head_module(model)
    separate = _main_loss_and_grads(model, corrector, head, batch)
    scale = LossScale(1024.0) if scaled else None
    joined = corrected_label_step(model, corrector, head, batch, loss_scale=scale)
    torch.testing.assert_close(joined.main_loss, separate.main_loss, rtol=1e-10, atol=1e-12)
    for name, grad in separate.main_grads.items():
        torch.testing.assert_close(joined.main_grads[name], grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(joined.corrected_labels, separate.corrected.detach())
    assert not joined.overflow
