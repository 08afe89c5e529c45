"""Distillation losses: hard-label CE, sparse top-k KL with a tail bucket, dense KL, JSD(beta).

Conventions shared by every function here:

* Each loss returns PER-TOKEN values, shape ``(B, L)``, float32 (inputs of any float dtype are
  upcast). Nothing here branches on array values, so the functions work inside ``mx.compile`` and
  under ``mx.value_and_grad``.
* Reduction is done once, by :func:`masked_mean`::

      mean = sum(per_token * mask * weights) / max(sum(mask), 1)

  Weights are absolute multipliers: a tool-span factor of 3 makes those tokens count three times
  without shrinking the others, and the denominator is the number of supervised tokens, not the
  weight total. ``n_tokens = sum(mask)`` is returned too so that gradient accumulation can add
  numerators and token counts across micro-batches and divide once.
* Masked positions may hold anything (label -100, padded teacher data, ``-inf`` log-probs): values
  there are selected away with ``where`` (never multiplied by 0), so they change neither the loss
  nor the gradient and cannot produce NaN.
* Temperature ``T`` divides the student logits; every KD loss (sparse, dense, JSD) is multiplied by
  ``T**2`` (Hinton et al.) so that gradient magnitudes stay comparable across temperatures and KD
  kinds. TRL's ``generalized_jsd_loss`` does not rescale; the two agree at ``T = 1``.

Sparse teacher data (API teachers): ``top_ids (B, L, K)`` int and ``top_logprobs (B, L, K)``, the
teacher's log-probs at ``T = 1``. Positions with fewer than K alternatives pad with
``top_logprobs = -inf`` (any id); padded entries contribute nothing. The valid ids at one position
must be distinct. The distribution is compared on K + 1 buckets: the valid top-k ids plus one tail
bucket holding all remaining mass (teacher: ``max(1 - sum(exp(top_logprobs)), 0)``; student: the
exact log-sum-exp over the ids outside the top-k, which stays accurate when the top-k covers almost
all of the student's mass, where ``log(1 - sum)`` would cancel to 0 in float32). When the valid ids
cover the whole vocabulary there is no tail bucket on either side.

Teacher tempering on buckets: each bucket mass ``m`` becomes ``m**(1/T)``, renormalized over the
buckets. This is exact when K = V (no tail); with a tail it treats the tail as ONE token, an
approximation of the true tempered tail ``sum_j p_j**(1/T)``. Teacher buckets are always
renormalized, which also absorbs rounding in API log-probs whose exponentials sum to slightly
more than 1.
"""

from __future__ import annotations

import math

import mlx.core as mx

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")

# Stand-in for -inf inside log-sum-exps: finite, so an all-masked row yields finite values and
# gradients (logsumexp over all -inf has a NaN gradient in MLX), and still exp() == 0 in float32.
_NEG = -1e30
# Reverse KL weighs log(q / p) by the student's mass, so a teacher tail of exactly 0 (top-k
# log-probs summing to >= 1 after API rounding) would make it infinite. Below ~1e-6, 1 - sum(p_k)
# of 20 float32 probabilities is rounding noise anyway.
REVERSE_KL_TAIL_FLOOR = 1e-6


def masked_sum(per_token: mx.array, mask: mx.array, weights: mx.array | None = None):
    """Return ``(sum(per_token * mask * weights), sum(mask))``, both float32 scalars."""
    maskf = mask.astype(mx.float32)
    values = per_token.astype(mx.float32) * maskf
    if weights is not None:
        values = values * weights.astype(mx.float32)
    return mx.where(maskf != 0, values, 0.0).sum(), maskf.sum()


def masked_mean(per_token: mx.array, mask: mx.array, weights: mx.array | None = None):
    """Return ``(sum(per_token * mask * weights) / max(sum(mask), 1), sum(mask))``."""
    total, n_tokens = masked_sum(per_token, mask, weights)
    return total / mx.maximum(n_tokens, 1.0), n_tokens


def tool_span_weights(tool_mask: mx.array, factor: float) -> mx.array:
    """Per-token weights: ``factor`` where ``tool_mask`` is set (inside tool-call JSON), else 1."""
    return mx.where(tool_mask.astype(mx.bool_), factor, 1.0).astype(mx.float32)


def _label_logits(logits: mx.array, labels: mx.array) -> mx.array:
    vocab = logits.shape[-1]
    labels = labels.astype(mx.int32)
    safe = mx.where((labels >= 0) & (labels < vocab), labels, 0)
    return mx.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]


def cross_entropy(logits: mx.array, labels: mx.array) -> mx.array:
    """Per-token ``-log softmax(logits)[label]``; out-of-range labels (e.g. -100) read id 0."""
    logits = logits.astype(mx.float32)
    return mx.logsumexp(logits, axis=-1) - _label_logits(logits, labels)


def _is_unit(temperature) -> bool:
    return isinstance(temperature, int | float) and temperature == 1


def _scaled(logits: mx.array, temperature) -> mx.array:
    """float32 ``logits / T``; no extra pass over the vocabulary when T is exactly 1."""
    logits = logits.astype(mx.float32)
    return logits if _is_unit(temperature) else logits / temperature


def _log_softmax(logits: mx.array, temperature):
    """``(log_softmax(logits / T), log-normalizer (B, L))``."""
    scaled = _scaled(logits, temperature)
    norm = mx.logsumexp(scaled, axis=-1, keepdims=True)
    return scaled - norm, norm[..., 0]


def _kl_pointwise(log_p: mx.array, log_q: mx.array, present: mx.array) -> mx.array:
    """``p * (log p - log q)`` where ``present``, else 0; absent entries may hold -inf or NaN."""
    safe_p = mx.where(present, log_p, 0.0)
    safe_q = mx.where(present, log_q, 0.0)
    return mx.where(present, mx.exp(safe_p) * (safe_p - safe_q), 0.0)


def _kl_terms(log_p: mx.array, log_q: mx.array, present: mx.array) -> mx.array:
    return _kl_pointwise(log_p, log_q, present).sum(axis=-1)


def _sparse_buckets(student_logits, top_ids, top_logprobs, temperature, tail, tail_floor):
    """Teacher and student log-masses on the top-k ids and, with ``tail``, the tail bucket.

    Returns ``(top, tail, student_norm)``: ``top = (log_p, log_q, valid)``, each ``(B, L, K)``;
    ``tail`` is None or ``(log_p, log_q, teacher_present, student_present)``, each ``(B, L)``;
    ``student_norm`` is ``logsumexp(logits / T)`` (None without a tail: it is never needed).
    """
    vocab = student_logits.shape[-1]
    ids = mx.clip(top_ids.astype(mx.int32), 0, vocab - 1)
    top_lp = top_logprobs.astype(mx.float32)
    valid = top_lp > -mx.inf  # NaN and -inf both count as padding
    teacher_top = mx.where(valid, top_lp / temperature, _NEG)

    scaled = _scaled(student_logits, temperature)
    student_top = mx.where(valid, mx.take_along_axis(scaled, ids, axis=-1), _NEG)
    student_top_norm = mx.logsumexp(student_top, axis=-1)

    if not tail:
        log_p = teacher_top - mx.logsumexp(teacher_top, axis=-1, keepdims=True)
        return (log_p, student_top - student_top_norm[..., None], valid), None, None

    # Which vocabulary ids are valid top-k entries; scatter-max is safe when padded entries
    # reuse a valid entry's id.
    batch_idx = mx.arange(ids.shape[0])[:, None, None]
    pos_idx = mx.arange(ids.shape[1])[None, :, None]
    in_top = mx.zeros(scaled.shape, mx.bool_).at[batch_idx, pos_idx, ids].maximum(valid)
    has_tail = mx.logical_not(mx.all(in_top, axis=-1))
    student_tail = mx.logsumexp(mx.where(in_top, _NEG, scaled), axis=-1)
    # The full normalizer from its two disjoint parts: one pass over the vocabulary, not two.
    student_norm = mx.logaddexp(student_tail, student_top_norm)

    top_mass = mx.where(valid, mx.exp(mx.where(valid, top_lp, 0.0)), 0.0).sum(axis=-1)
    teacher_tail = mx.where(has_tail, mx.maximum(1.0 - top_mass, tail_floor), 0.0)
    tail_present = teacher_tail > 0
    teacher_tail = mx.where(
        tail_present, mx.log(mx.where(tail_present, teacher_tail, 1.0)) / temperature, _NEG
    )
    teacher_norm = mx.logaddexp(mx.logsumexp(teacher_top, axis=-1), teacher_tail)
    top = (
        teacher_top - teacher_norm[..., None],
        student_top - student_norm[..., None],
        valid,
    )
    tail_bucket = (teacher_tail - teacher_norm, student_tail - student_norm, tail_present, has_tail)
    return top, tail_bucket, student_norm


def _sparse_kl(student_logits, top_ids, top_logprobs, temperature, tail, reverse):
    floor = REVERSE_KL_TAIL_FLOOR if reverse else 0.0
    (log_p, log_q, valid), tail_bucket, student_norm = _sparse_buckets(
        student_logits, top_ids, top_logprobs, temperature, tail, floor
    )
    kl = _kl_terms(log_q, log_p, valid) if reverse else _kl_terms(log_p, log_q, valid)
    if tail_bucket is not None:
        tail_p, tail_q, teacher_has_tail, student_has_tail = tail_bucket
        if reverse:
            kl = kl + _kl_pointwise(tail_q, tail_p, student_has_tail)
        else:
            kl = kl + _kl_pointwise(tail_p, tail_q, teacher_has_tail)
    return kl * (temperature * temperature), student_norm


def sparse_forward_kl(
    student_logits: mx.array,
    top_ids: mx.array,
    top_logprobs: mx.array,
    temperature=1.0,
    tail: bool = True,
) -> mx.array:
    """Per-token ``T**2 * KL(p_teacher || p_student)`` on the top-k (+ tail) buckets.

    ``tail=False`` renormalizes both distributions over the valid top-k ids only.
    """
    return _sparse_kl(student_logits, top_ids, top_logprobs, temperature, tail, False)[0]


def sparse_reverse_kl(
    student_logits: mx.array,
    top_ids: mx.array,
    top_logprobs: mx.array,
    temperature=1.0,
    tail: bool = True,
) -> mx.array:
    """Per-token ``T**2 * KL(p_student || p_teacher)`` on the top-k (+ tail) buckets.

    The teacher's tail mass is floored at ``REVERSE_KL_TAIL_FLOOR`` so the loss stays finite.
    """
    return _sparse_kl(student_logits, top_ids, top_logprobs, temperature, tail, True)[0]


def _dense_divergence(student_logits, teacher_logits, temperature, beta):
    """Per-token ``T**2 * JSD_beta`` (beta 0: forward KL, 1: reverse KL) and the student's
    log-normalizer."""
    log_q, student_norm = _log_softmax(student_logits, temperature)
    log_p, _ = _log_softmax(teacher_logits, temperature)
    teacher_present, student_present = log_p > -mx.inf, log_q > -mx.inf
    if beta == 0.0:
        divergence = _kl_terms(log_p, log_q, teacher_present)
    elif beta == 1.0:
        divergence = _kl_terms(log_q, log_p, student_present)
    else:
        log_p = mx.where(teacher_present, log_p, _NEG)
        log_q = mx.where(student_present, log_q, _NEG)
        # log(p/m) and log(q/m) from r = log(p/q) directly rather than log p - log m: that
        # subtraction cancels to float32 noise of |log p| near beta = 0 or 1, where
        # KL(P_S || M) is O(beta^2) and the limit checks divide by beta.
        log_ratio = log_p - log_q
        log_p_over_m = -mx.logaddexp(math.log(beta), math.log1p(-beta) - log_ratio)
        log_q_over_m = -mx.logaddexp(math.log1p(-beta), math.log(beta) + log_ratio)
        teacher_term = mx.where(teacher_present, mx.exp(log_p) * log_p_over_m, 0.0)
        student_term = mx.where(student_present, mx.exp(log_q) * log_q_over_m, 0.0)
        divergence = (beta * teacher_term + (1.0 - beta) * student_term).sum(axis=-1)
    return divergence * (temperature * temperature), student_norm


def dense_forward_kl(student_logits: mx.array, teacher_logits: mx.array, temperature=1.0):
    """Per-token ``T**2 * KL(softmax(t / T) || softmax(s / T))`` over the full vocabulary."""
    return _dense_divergence(student_logits, teacher_logits, temperature, 0.0)[0]


def dense_reverse_kl(student_logits: mx.array, teacher_logits: mx.array, temperature=1.0):
    """Per-token ``T**2 * KL(softmax(s / T) || softmax(t / T))`` over the full vocabulary."""
    return _dense_divergence(student_logits, teacher_logits, temperature, 1.0)[0]


def _check_beta(beta) -> float:
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    return beta


def generalized_jsd(
    student_logits: mx.array, teacher_logits: mx.array, beta: float, temperature=1.0
) -> mx.array:
    """Per-token generalized JSD of the GKD paper (Agarwal et al. 2024), TRL's convention.

    ``beta * KL(P_T || M) + (1 - beta) * KL(P_S || M)`` with ``M = beta * P_T + (1 - beta) * P_S``
    (teacher weight ``beta``). ``beta = 0`` is exactly forward ``KL(P_T || P_S)`` and ``beta = 1``
    exactly reverse ``KL(P_S || P_T)``; near the ends it approaches ``beta`` (resp. ``1 - beta``)
    times that KL. ``beta`` must be a Python float in [0, 1]. Scaled by ``T**2`` like the KLs.
    """
    return _dense_divergence(student_logits, teacher_logits, temperature, _check_beta(beta))[0]


def _kd_per_token(kind, student_logits, top_ids, top_logprobs, teacher_logits, temperature,
                  beta, tail):
    """``(per-token KD, student log-normalizer at T or None)``."""
    sparse = top_ids is not None or top_logprobs is not None
    if sparse and teacher_logits is not None:
        raise ValueError("kd_loss: give either top_ids/top_logprobs or teacher_logits, not both")
    if sparse and (top_ids is None or top_logprobs is None):
        raise ValueError("kd_loss: top_ids and top_logprobs must be given together")
    if not sparse and teacher_logits is None:
        raise ValueError("kd_loss: alpha < 1 needs teacher data (top_ids/top_logprobs or "
                         "teacher_logits)")
    if kind == "jsd" and sparse:
        raise ValueError("kd_loss: kind 'jsd' needs dense teacher_logits")
    if sparse:
        return _sparse_kl(student_logits, top_ids, top_logprobs, temperature, tail,
                          kind == "reverse_kl")
    dense_beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(kind, beta)
    return _dense_divergence(student_logits, teacher_logits, temperature, _check_beta(dense_beta))


def kd_loss(
    student_logits: mx.array,
    labels: mx.array,
    mask: mx.array,
    *,
    alpha=0.5,
    kind: str = "forward_kl",
    temperature=1.0,
    top_ids: mx.array | None = None,
    top_logprobs: mx.array | None = None,
    teacher_logits: mx.array | None = None,
    kd_mask: mx.array | None = None,
    weights: mx.array | None = None,
    beta: float = 0.5,
    tail: bool = True,
) -> dict[str, mx.array]:
    """Mix hard-label CE with a KD divergence; returns scalar parts for the step and for logging.

    Per supervised token (``mask``), with ``a = kd_mask`` (teacher distribution available there)::

        a = 1:  alpha * CE + (1 - alpha) * KD
        a = 0:  CE                         (CE-only fallback at unaligned positions)

    ``loss`` reduces that with :func:`masked_mean` (``weights`` as absolute multipliers, divided by
    ``n_tokens = sum(mask)``). For logging, ``ce`` is the weighted masked mean of CE over
    ``n_tokens`` and ``kd`` the weighted mean of KD over ``n_kd_tokens = sum(mask * kd_mask)``; when
    every token has a teacher, ``loss == alpha * ce + (1 - alpha) * kd``. ``kind`` picks the KD
    divergence (sparse when ``top_ids``/``top_logprobs`` are given, dense with ``teacher_logits``;
    ``jsd`` is dense only). With ``alpha == 1`` and no teacher data the loss is plain CE.
    ``alpha`` and ``temperature`` may be floats or scalar arrays; ``beta`` must be a float.
    """
    if kind not in KD_KINDS:
        raise ValueError(f"kd_loss: kind must be one of {', '.join(KD_KINDS)}, got {kind!r}")
    mask = mask.astype(mx.bool_)
    no_teacher = top_ids is None and top_logprobs is None and teacher_logits is None
    if no_teacher and isinstance(alpha, int | float) and alpha == 1:
        ce = cross_entropy(student_logits, labels)
        kd = mx.zeros_like(ce)
        available = mx.zeros_like(mask)
    else:
        kd, student_norm = _kd_per_token(kind, student_logits, top_ids, top_logprobs,
                                         teacher_logits, temperature, beta, tail)
        if student_norm is not None and _is_unit(temperature):
            # At T = 1 the KD pass already holds logsumexp(logits): reuse it for CE.
            ce = student_norm - _label_logits(student_logits.astype(mx.float32), labels)
        else:
            ce = cross_entropy(student_logits, labels)
        available = mask if kd_mask is None else mask & kd_mask.astype(mx.bool_)
        kd = mx.where(available, kd, 0.0)
    per_token = mx.where(available, alpha * ce + (1 - alpha) * kd, ce)
    loss, n_tokens = masked_mean(per_token, mask, weights)
    ce_mean, _ = masked_mean(ce, mask, weights)
    kd_mean, n_kd_tokens = masked_mean(kd, available, weights)
    return {"loss": loss, "ce": ce_mean, "kd": kd_mean, "n_tokens": n_tokens,
            "n_kd_tokens": n_kd_tokens}
