"""KD losses against independent float64 numpy references (dense formulas, bucket formula)."""

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_distill import losses

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- float64 numpy references
def np_lse(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np_lse(x)[..., None]


def np_kl(log_p, log_q):
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def np_cross_entropy(logits, labels):
    lp = np_log_softmax(logits)
    return -np.take_along_axis(lp, np.clip(labels, 0, None)[..., None], -1)[..., 0]


def np_dense(student, teacher, temperature, reverse=False):
    lq = np_log_softmax(np.asarray(student, np.float64) / temperature)
    lp = np_log_softmax(np.asarray(teacher, np.float64) / temperature)
    kl = np_kl(lq, lp) if reverse else np_kl(lp, lq)
    return kl * temperature**2


def np_jsd(student, teacher, beta, temperature=1.0):
    lq = np_log_softmax(np.asarray(student, np.float64) / temperature)
    lp = np_log_softmax(np.asarray(teacher, np.float64) / temperature)
    lm = np.log(beta * np.exp(lp) + (1 - beta) * np.exp(lq))
    return (beta * np_kl(lp, lm) + (1 - beta) * np_kl(lq, lm)) * temperature**2


def np_bucket_kl(student, ids, top_lp, temperature, tail, reverse):
    """The documented K(+1)-bucket divergence, one position at a time, in float64."""
    student = np.asarray(student, np.float64)
    out = np.zeros(student.shape[:2])
    vocab = student.shape[-1]
    for b in range(student.shape[0]):
        for pos in range(student.shape[1]):
            lq_all = np_log_softmax(student[b, pos] / temperature)
            lp = np.asarray(top_lp[b, pos], np.float64)
            valid = np.isfinite(lp)
            top = ids[b, pos][valid]
            t_mass = list(np.exp(lp[valid]))
            s_log = list(lq_all[top])
            rest = np.setdiff1d(np.arange(vocab), top)
            if tail and rest.size:
                floor = losses.REVERSE_KL_TAIL_FLOOR if reverse else 0.0
                t_mass.append(max(1.0 - sum(t_mass), floor))
                s_log.append(np_lse(lq_all[rest]))
            if not t_mass:
                continue
            s_log = np.array(s_log)
            if not tail:
                s_log = s_log - np_lse(s_log)
            with np.errstate(divide="ignore"):
                t_log = np.log(np.array(t_mass)) / temperature
            t_log = t_log - np_lse(t_log)
            kl = np_kl(s_log, t_log) if reverse else np_kl(t_log, s_log)
            out[b, pos] = kl * temperature**2
    return out


# ---------------------------------------------------------------- data
def sparse_teacher(rng, shape, k, pad_p=0.0, spread=2.0):
    """Teacher top-k (sorted, float32 log-probs) from random logits; padded entries get -inf and
    garbage ids (out of range, or repeating a valid id)."""
    b, length, vocab = shape
    t = rng.uniform(-spread, spread, shape)
    lp = np_log_softmax(t)
    ids = np.argsort(-t, axis=-1)[..., :k].astype(np.int32)
    top_lp = np.take_along_axis(lp, ids, -1).astype(np.float32)
    pad = rng.random((b, length, k)) < pad_p
    top_lp[pad] = -np.inf
    garbage = rng.choice(np.array([-7, vocab + 3, 0], np.int32), size=ids.shape)
    ids = np.where(pad, np.where(rng.random(ids.shape) < 0.5, ids[..., :1], garbage), ids)
    return t, ids.astype(np.int32), top_lp


def full_vocab_teacher(rng, teacher_logits):
    """K = V: every id, in a random order per position, with exact log-probs."""
    lp = np_log_softmax(teacher_logits)
    ids = np.argsort(rng.random(lp.shape), axis=-1).astype(np.int32)
    return ids, np.take_along_axis(lp, ids, -1).astype(np.float32)


def grad_wrt_logits(fn, logits):
    return mx.grad(lambda z: fn(z).sum())(mx.array(logits, mx.float32))


# ---------------------------------------------------------------- CE, reduction, weights
@given(b=st.integers(1, 3), length=st.integers(1, 5), vocab=st.integers(2, 20),
       seed=st.integers(0, 9999))
@FAST
def test_cross_entropy_matches_numpy_and_ignores_garbage_labels(b, length, vocab, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (b, length, vocab)).astype(np.float32)
    labels = rng.integers(0, vocab, (b, length))
    mask = rng.random((b, length)) < 0.7
    got = np.array(losses.cross_entropy(mx.array(logits), mx.array(labels)))
    np.testing.assert_allclose(got, np_cross_entropy(logits, labels), rtol=1e-5, atol=1e-5)
    garbage = np.where(mask, labels, rng.choice([-100, vocab, 10**6], size=labels.shape))
    per_token = losses.cross_entropy(mx.array(logits), mx.array(garbage))
    assert np.isfinite(np.array(per_token)).all()
    mean, n = losses.masked_mean(per_token, mx.array(mask))
    expect = np_cross_entropy(logits, labels)[mask].sum() / max(mask.sum(), 1)
    assert float(n) == mask.sum()
    np.testing.assert_allclose(float(mean), expect, rtol=1e-5, atol=1e-6)


def test_masked_mean_weights_are_absolute_multipliers():
    per_token = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]])
    tool = np.array([[0, 1, 1, 1]])
    weights = losses.tool_span_weights(mx.array(tool), 3.0)
    np.testing.assert_array_equal(np.array(weights), [[1.0, 3.0, 3.0, 3.0]])
    mean, n = losses.masked_mean(mx.array(per_token), mx.array(mask), weights)
    assert float(n) == 3.0
    assert float(mean) == pytest.approx((1 + 2 * 3 + 3 * 3) / 3)
    total, n = losses.masked_sum(mx.array(per_token), mx.array(mask), weights)
    assert (float(total), float(n)) == pytest.approx((16.0, 3.0))
    nan_inside = mx.array([[np.nan, np.inf, 1.0, 1.0]])
    mean, n = losses.masked_mean(nan_inside, mx.zeros((1, 4)))
    assert (float(mean), float(n)) == (0.0, 0.0)


# ---------------------------------------------------------------- sparse vs dense references
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("tail", [True, False])
def test_sparse_with_all_ids_equals_dense_kl(temperature, tail):
    rng = np.random.default_rng(0)
    student = rng.normal(0, 2, (2, 3, 11)).astype(np.float32)
    teacher = rng.normal(0, 2, (2, 3, 11))
    ids, top_lp = full_vocab_teacher(rng, teacher)
    args = (mx.array(student), mx.array(ids), mx.array(top_lp), temperature, tail)
    forward = np.array(losses.sparse_forward_kl(*args))
    reverse = np.array(losses.sparse_reverse_kl(*args))
    np.testing.assert_allclose(forward, np_dense(student, teacher, temperature), rtol=1e-4,
                               atol=2e-6)
    np.testing.assert_allclose(reverse, np_dense(student, teacher, temperature, reverse=True),
                               rtol=1e-4, atol=2e-6)
    dense = losses.dense_forward_kl(mx.array(student), mx.array(teacher, mx.float32), temperature)
    np.testing.assert_allclose(np.array(dense), forward, rtol=1e-4, atol=2e-6)


@st.composite
def sparse_cases(draw):
    vocab = draw(st.integers(2, 12))
    return dict(
        shape=(draw(st.integers(1, 3)), draw(st.integers(1, 4)), vocab),
        k=draw(st.integers(1, vocab)),
        pad_p=draw(st.sampled_from([0.0, 0.3, 1.0])),
        temperature=draw(st.one_of(st.just(1.0), st.floats(0.5, 4.0))),
        tail=draw(st.booleans()),
        seed=draw(st.integers(0, 10**6)),
    )


@given(case=sparse_cases())
@FAST
def test_sparse_kls_match_bucket_formula(case):
    rng = np.random.default_rng(case["seed"])
    student = rng.normal(0, 2, case["shape"]).astype(np.float32)
    _, ids, top_lp = sparse_teacher(rng, case["shape"], case["k"], case["pad_p"])
    temperature, tail = case["temperature"], case["tail"]
    args = (mx.array(student), mx.array(ids), mx.array(top_lp), temperature, tail)
    for fn, reverse in ((losses.sparse_forward_kl, False), (losses.sparse_reverse_kl, True)):
        got = np.array(fn(*args))
        expect = np_bucket_kl(student, ids, top_lp, temperature, tail, reverse)
        np.testing.assert_allclose(got, expect, rtol=2e-4, atol=2e-5)
        grads = np.array(grad_wrt_logits(lambda z, fn=fn: fn(z, *args[1:]), student))
        assert np.isfinite(grads).all()


def test_student_tail_is_precise_when_top_k_holds_almost_all_mass():
    # Student puts ~1e-15 outside its top-3: 1 - sum(q_k) is exactly 0 in float32.
    student = np.full((1, 1, 8), -25.0, np.float32)
    student[0, 0, :3] = [10.0, 9.0, 8.0]
    ids = np.array([[[0, 1, 2]]], np.int32)
    top_lp = np.log(np.array([[[0.6, 0.3, 0.09]]])).astype(np.float32)  # teacher tail 0.01
    args = (mx.array(ids), mx.array(top_lp))
    got = float(losses.sparse_forward_kl(mx.array(student), *args)[0, 0])
    expect = np_bucket_kl(student, ids, top_lp, 1.0, True, False)[0, 0]
    assert expect > 0.25  # the tail term dominates: 0.01 * log(0.01 / 2e-15)
    assert got == pytest.approx(expect, rel=1e-4)
    grad = np.array(grad_wrt_logits(lambda z: losses.sparse_forward_kl(z, *args), student))[0, 0]
    # d/dz_j on a tail id = q_j - p_tail * q_j / q_tail: the teacher's tail split by student shares.
    lq = np_log_softmax(student[0, 0].astype(np.float64))
    q_tail = np.exp(np_lse(lq[3:]))
    p_tail = 1 - np.exp(top_lp.astype(np.float64)).sum()
    np.testing.assert_allclose(grad[3:], np.exp(lq[3:]) * (1 - p_tail / q_tail), rtol=1e-3)
    assert float(losses.sparse_reverse_kl(mx.array(student), *args)[0, 0]) == pytest.approx(
        np_bucket_kl(student, ids, top_lp, 1.0, True, True)[0, 0], rel=1e-4, abs=1e-6
    )


@pytest.mark.parametrize("temperature,tail,reverse", [
    (1.0, True, False), (2.0, True, False), (1.5, False, False), (2.0, True, True),
])
def test_sparse_kl_gradient_matches_finite_differences(temperature, tail, reverse):
    rng = np.random.default_rng(3)
    student = rng.normal(0, 1.5, (1, 2, 8))
    _, ids, top_lp = sparse_teacher(rng, (1, 2, 8), 3, pad_p=0.2)
    kl = losses.sparse_reverse_kl if reverse else losses.sparse_forward_kl
    fn = lambda z: kl(z, mx.array(ids), mx.array(top_lp), temperature, tail)  # noqa: E731
    got = np.array(grad_wrt_logits(fn, student.astype(np.float32)))
    step = 1e-6
    numeric = np.zeros_like(student)
    for index in np.ndindex(student.shape):
        plus, minus = student.copy(), student.copy()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (
            np_bucket_kl(plus, ids, top_lp, temperature, tail, reverse).sum()
            - np_bucket_kl(minus, ids, top_lp, temperature, tail, reverse).sum()
        ) / (2 * step)
    np.testing.assert_allclose(got, numeric, rtol=1e-3, atol=2e-5)


def test_padded_top_k_gives_finite_values_and_grads():
    rng = np.random.default_rng(5)
    student = rng.normal(0, 30, (2, 3, 9)).astype(np.float32)  # includes near-one-hot rows
    _, ids, top_lp = sparse_teacher(rng, (2, 3, 9), 4, pad_p=0.5)
    top_lp[0, 0] = -np.inf  # a position with no teacher alternatives at all
    ids[0, 0] = [-1, 100, 3, 3]
    top_lp[1, 2, 1:] = -np.inf  # a single alternative
    for fn in (losses.sparse_forward_kl, losses.sparse_reverse_kl):
        for tail in (True, False):
            call = lambda z, fn=fn, tail=tail: fn(z, mx.array(ids), mx.array(top_lp), 2.0, tail)  # noqa: E731
            value = np.array(call(mx.array(student)))
            assert np.isfinite(value).all() and (value > -1e-5).all()
            assert np.isfinite(np.array(grad_wrt_logits(call, student))).all()
            expect = np_bucket_kl(student, ids, top_lp, 2.0, tail, fn is losses.sparse_reverse_kl)
            np.testing.assert_allclose(value, expect, rtol=2e-4, atol=1e-4)


def test_temperature_squared_scaling():
    # Scaling every logit by T and then tempering by T leaves both distributions unchanged,
    # so only the T^2 factor remains.
    rng = np.random.default_rng(7)
    student = rng.normal(0, 1, (2, 2, 10))
    teacher = rng.normal(0, 1, (2, 2, 10))
    temperature = 3.0
    ids = np.argsort(rng.random(student.shape), axis=-1).astype(np.int32)

    def top_logprobs(logits):
        return mx.array(np.take_along_axis(np_log_softmax(logits), ids, -1).astype(np.float32))

    for fn in (losses.sparse_forward_kl, losses.sparse_reverse_kl):
        base = fn(mx.array(student, mx.float32), mx.array(ids), top_logprobs(teacher))
        scaled = fn(mx.array(student * temperature, mx.float32), mx.array(ids),
                    top_logprobs(teacher * temperature), temperature)
        np.testing.assert_allclose(np.array(scaled), temperature**2 * np.array(base), rtol=2e-4)
    s, t = mx.array(student, mx.float32), mx.array(teacher, mx.float32)
    for fn in (losses.dense_forward_kl, losses.dense_reverse_kl):
        np.testing.assert_allclose(np.array(fn(s * temperature, t * temperature, temperature)),
                                   temperature**2 * np.array(fn(s, t)), rtol=2e-4)


# ---------------------------------------------------------------- dense KL and JSD
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_kls_and_jsd_match_numpy(temperature):
    rng = np.random.default_rng(11)
    student = rng.normal(0, 2, (2, 4, 16))
    teacher = rng.normal(0, 2, (2, 4, 16))
    s, t = mx.array(student, mx.float32), mx.array(teacher, mx.float32)
    fwd = np.array(losses.dense_forward_kl(s, t, temperature))
    rev = np.array(losses.dense_reverse_kl(s, t, temperature))
    np.testing.assert_allclose(fwd, np_dense(student, teacher, temperature), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rev, np_dense(student, teacher, temperature, reverse=True),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.array(losses.generalized_jsd(s, t, 0.0, temperature)), fwd)
    np.testing.assert_array_equal(np.array(losses.generalized_jsd(s, t, 1.0, temperature)), rev)
    for beta in (0.1, 0.5, 0.9):
        got = np.array(losses.generalized_jsd(s, t, beta, temperature))
        np.testing.assert_allclose(got, np_jsd(student, teacher, beta, temperature), rtol=1e-4,
                                   atol=1e-6)


def test_jsd_limits_and_symmetry():
    rng = np.random.default_rng(13)
    # Mild logits: JSD_beta / beta -> KL only once beta << min q/p, so the truncation error
    # (~beta * chi^2) stays below 1e-3 here.
    student = rng.normal(0, 1, (3, 5, 12))
    teacher = rng.normal(0, 1, (3, 5, 12))
    s, t = mx.array(student, mx.float32), mx.array(teacher, mx.float32)
    beta = 1e-4
    near_forward = np.array(losses.generalized_jsd(s, t, beta)) / beta
    near_reverse = np.array(losses.generalized_jsd(s, t, 1 - beta)) / beta
    np.testing.assert_allclose(near_forward, np_dense(student, teacher, 1.0), rtol=2e-3)
    np.testing.assert_allclose(near_forward, np_jsd(student, teacher, beta) / beta, rtol=1e-4)
    reverse = np_dense(student, teacher, 1.0, reverse=True)
    np.testing.assert_allclose(near_reverse, reverse, rtol=2e-3)
    np.testing.assert_allclose(near_reverse, np_jsd(student, teacher, 1 - beta) / beta, rtol=1e-4)
    jsd = np.array(losses.generalized_jsd(s, t, 0.5))
    swapped = np.array(losses.generalized_jsd(t, s, 0.5))
    np.testing.assert_allclose(jsd, swapped, rtol=1e-5, atol=1e-7)
    assert (jsd >= -1e-6).all() and (jsd <= math.log(2) + 1e-6).all()
    with pytest.raises(ValueError, match="beta"):
        losses.generalized_jsd(s, t, 1.5)


# ---------------------------------------------------------------- kd_loss
def np_kd_loss(ce, kd, mask, available, weights, alpha):
    mask, available = mask.astype(bool), available.astype(bool) & mask.astype(bool)
    per_token = np.where(available, alpha * ce + (1 - alpha) * kd, ce)
    n, n_kd = mask.sum(), available.sum()
    return {"loss": (per_token * weights)[mask].sum() / max(n, 1),
            "ce": (ce * weights)[mask].sum() / max(n, 1),
            "kd": (kd * weights)[available].sum() / max(n_kd, 1),
            "n_tokens": n, "n_kd_tokens": n_kd}


@given(case=sparse_cases(), mask_p=st.sampled_from([0.0, 0.6, 1.0]),
       kd_p=st.sampled_from([0.0, 0.5, 1.0]), alpha=st.floats(0.0, 1.0),
       kind=st.sampled_from(["forward_kl", "reverse_kl"]))
@FAST
def test_kd_loss_combines_ce_and_sparse_kd(case, mask_p, kd_p, alpha, kind):
    rng = np.random.default_rng(case["seed"])
    shape = case["shape"]
    student = rng.normal(0, 2, shape).astype(np.float32)
    _, ids, top_lp = sparse_teacher(rng, shape, case["k"], case["pad_p"])
    labels = rng.integers(0, shape[-1], shape[:2])
    mask = rng.random(shape[:2]) < mask_p
    kd_mask = rng.random(shape[:2]) < kd_p
    weights = np.where(rng.random(shape[:2]) < 0.3, 2.5, 1.0)

    def parts(z):
        return losses.kd_loss(
            z, mx.array(labels), mx.array(mask), alpha=alpha, kind=kind,
            temperature=case["temperature"], top_ids=mx.array(ids), top_logprobs=mx.array(top_lp),
            kd_mask=mx.array(kd_mask), weights=mx.array(weights, mx.float32), tail=case["tail"],
        )

    (got, grads) = mx.value_and_grad(lambda z: parts(z)["loss"])(mx.array(student))
    result = parts(mx.array(student))
    kd = np_bucket_kl(student, ids, top_lp, case["temperature"], case["tail"], kind == "reverse_kl")
    expect = np_kd_loss(np_cross_entropy(student, labels), kd, mask, kd_mask, weights, alpha)
    for key, value in expect.items():
        assert float(result[key]) == pytest.approx(value, rel=2e-4, abs=5e-5), key
    assert np.isfinite(np.array(grads)).all()
    if not mask.any():
        assert float(got) == 0.0 and not np.array(grads).any()


def test_kd_loss_with_full_coverage_is_alpha_mix_and_alpha_one_is_ce():
    rng = np.random.default_rng(17)
    student = mx.array(rng.normal(0, 1, (2, 5, 9)), mx.float32)
    teacher = mx.array(rng.normal(0, 1, (2, 5, 9)), mx.float32)
    labels = mx.array(rng.integers(0, 9, (2, 5)))
    mask = mx.array(rng.random((2, 5)) < 0.8)
    ce = np_cross_entropy(np.array(student), np.array(labels))[np.array(mask)].mean()
    for kind in losses.KD_KINDS:
        parts = losses.kd_loss(student, labels, mask, alpha=0.3, kind=kind, teacher_logits=teacher)
        assert float(parts["ce"]) == pytest.approx(ce, rel=1e-5)
        mix = 0.3 * float(parts["ce"]) + 0.7 * float(parts["kd"])
        assert float(parts["loss"]) == pytest.approx(mix, rel=1e-5)
        assert float(parts["n_kd_tokens"]) == float(parts["n_tokens"])
    ce_only = losses.kd_loss(student, labels, mask, alpha=1.0)
    assert float(ce_only["loss"]) == pytest.approx(ce, rel=1e-5)
    assert float(ce_only["n_kd_tokens"]) == 0.0


def test_kd_loss_rejects_bad_arguments():
    z = mx.zeros((1, 2, 5))
    labels, mask = mx.zeros((1, 2), mx.int32), mx.ones((1, 2))
    ids, lp = mx.zeros((1, 2, 2), mx.int32), mx.zeros((1, 2, 2))
    with pytest.raises(ValueError, match="kind must be one of"):
        losses.kd_loss(z, labels, mask, kind="kl", teacher_logits=z)
    with pytest.raises(ValueError, match="dense teacher_logits"):
        losses.kd_loss(z, labels, mask, kind="jsd", top_ids=ids, top_logprobs=lp)
    with pytest.raises(ValueError, match="not both"):
        losses.kd_loss(z, labels, mask, top_ids=ids, top_logprobs=lp, teacher_logits=z)
    with pytest.raises(ValueError, match="together"):
        losses.kd_loss(z, labels, mask, top_ids=ids)
    with pytest.raises(ValueError, match="needs teacher data"):
        losses.kd_loss(z, labels, mask, alpha=0.5)


@pytest.mark.parametrize("kind,dense", [("forward_kl", False), ("reverse_kl", False),
                                        ("forward_kl", True), ("jsd", True)])
def test_masked_positions_change_neither_loss_nor_gradient(kind, dense):
    rng = np.random.default_rng(19)
    shape = (2, 6, 10)
    student = rng.normal(0, 2, shape).astype(np.float32)
    teacher, ids, top_lp = sparse_teacher(rng, shape, 4, pad_p=0.2)
    labels = rng.integers(0, 10, shape[:2])
    mask = rng.random(shape[:2]) < 0.6
    kd_mask = rng.random(shape[:2]) < 0.7
    weights = np.where(rng.random(shape[:2]) < 0.5, 2.0, 1.0).astype(np.float32)

    def run(student, labels, teacher, ids, top_lp):
        teacher_args = (
            {"teacher_logits": mx.array(teacher, mx.float32)} if dense
            else {"top_ids": mx.array(ids), "top_logprobs": mx.array(top_lp)}
        )
        fn = lambda z: losses.kd_loss(  # noqa: E731
            z, mx.array(labels), mx.array(mask), alpha=0.4, kind=kind, temperature=2.0,
            kd_mask=mx.array(kd_mask), weights=mx.array(weights), beta=0.3, **teacher_args,
        )["loss"]
        loss, grad = mx.value_and_grad(fn)(mx.array(student))
        return float(loss), np.array(grad)

    base_loss, base_grad = run(student, labels, teacher, ids, top_lp)
    off = ~mask
    no_teacher = off | ~kd_mask
    s2, l2, t2, i2, p2 = student.copy(), labels.copy(), teacher.copy(), ids.copy(), top_lp.copy()
    s2[off] = rng.normal(0, 50, s2[off].shape)
    l2[off] = -100
    t2[no_teacher] = rng.normal(0, 50, t2[no_teacher].shape)
    i2[no_teacher] = rng.integers(-5, 20, i2[no_teacher].shape)
    p2[no_teacher] = np.where(rng.random(p2[no_teacher].shape) < 0.5, -np.inf, 3.0)
    loss, grad = run(s2, l2, t2, i2, p2)
    assert loss == pytest.approx(base_loss, rel=1e-6)
    np.testing.assert_allclose(grad, base_grad, rtol=1e-5, atol=1e-8)
    assert not grad[off].any()


def _compile_inputs():
    rng = np.random.default_rng(23)
    shape = (2, 5, 12)
    teacher, ids, top_lp = sparse_teacher(rng, shape, 5, pad_p=0.3)
    return [mx.array(rng.normal(0, 2, shape), mx.float32), mx.array(ids), mx.array(top_lp),
            mx.array(teacher, mx.float32), mx.array(rng.integers(0, 12, shape[:2])),
            mx.array(rng.random(shape[:2]) < 0.7), mx.array(rng.random(shape[:2]) < 0.8),
            losses.tool_span_weights(mx.array(rng.random(shape[:2]) < 0.3), 2.0)]


def test_kd_step_under_compile_matches_eager():
    # The trainer's path (sparse forward KL with tail, CE fallback, tool weights). Every fused
    # kernel is JIT-built by the C++ compiler on first use (cached under $TMPDIR/mlx), about a
    # second each on a 2-core box; the other losses are traced by the next test.
    def objective(z, ids, top_lp, teacher, labels, mask, kd_mask, weights):
        parts = losses.kd_loss(z, labels, mask, alpha=0.2, top_ids=ids, top_logprobs=top_lp,
                               kd_mask=kd_mask, weights=weights)
        return parts["loss"], parts

    step, args = mx.value_and_grad(objective), _compile_inputs()
    (eager_loss, eager_parts), eager_grad = step(*args)
    (loss, parts), grad = mx.compile(step)(*args)
    assert float(loss) == pytest.approx(float(eager_loss), rel=1e-5)
    for key, value in eager_parts.items():
        assert float(parts[key]) == pytest.approx(float(value), rel=1e-5), key
    np.testing.assert_allclose(np.array(grad), np.array(eager_grad), rtol=1e-4, atol=1e-7)


def test_all_losses_trace_as_graphs(tmp_path):
    # mx.export_function traces under the same rules as mx.compile (no Python branching on array
    # values, no .item()) without JIT-building kernels; the replayed graph must match eager.
    def objective(z, ids, top_lp, teacher, labels, mask, kd_mask, weights):
        total = mx.array(0.0)
        for kind, tail in [(k, t) for k in ("forward_kl", "reverse_kl") for t in (True, False)]:
            total = total + losses.kd_loss(
                z, labels, mask, alpha=0.3, kind=kind, temperature=1.5, top_ids=ids,
                top_logprobs=top_lp, kd_mask=kd_mask, weights=weights, tail=tail)["loss"]
        for kind, temperature in [(k, t) for k in losses.KD_KINDS for t in (1.0, 2.0)]:
            total = total + losses.kd_loss(z, labels, mask, alpha=0.3, kind=kind, beta=0.4,
                                           temperature=temperature, teacher_logits=teacher)["loss"]
        return total

    step, args, path = mx.value_and_grad(objective), _compile_inputs(), str(tmp_path / "f.mlxfn")
    mx.export_function(path, step, *args)
    loss, grad = mx.import_function(path)(*args)
    eager_loss, eager_grad = step(*args)
    assert float(loss) == pytest.approx(float(eager_loss), rel=1e-6)
    np.testing.assert_allclose(np.array(grad), np.array(eager_grad), rtol=1e-5, atol=1e-8)
