"""Triton kernels: one program per row of logits (or per sequence for the weights).

Every load is upcast at once to the accumulation type ACC (fp32; fp64 for fp64 inputs, so
gradcheck can run; bf16 arithmetic is also wrong in Triton's CPU interpreter), rows are addressed with 64-bit offsets, and each row is read once per pass:
``_token_stats_fwd_kernel`` (policy and, optionally, scorer row in the same program) ->
``_remit_weights_kernel`` (per sequence) -> ``_ce_bwd_kernel`` (gradient, optionally in place);
``_pg_terms_kernel`` is the policy-gradient loss's per-token epilogue (O(N), blocks of tokens);
``_kd_fwd_kernel`` / ``_kd_bwd_kernel`` are distillation's pair, reading a student and a teacher row
side by side.
"""

import triton
import triton.language as tl

# A global read inside @triton.jit must be a tl.constexpr: a plain float compiles under
# TRITON_INTERPRET=1 but is refused by the GPU compiler (NameError on global access).
NEG_INF = tl.constexpr(float("-inf"))

# Compiler options of every launch (ops.py passes them; tools/triton_check.py compiles with them
# and checks their effect in the PTX). No FMA contraction: it would turn x * inv_temp - m into
# fma(x, inv_temp, -m), whose value at the row max is the rounding error of x * inv_temp instead
# of 0, so a confident target's log-prob came out positive at temperature != 1 (and the moments
# mixed rounded and unrounded products). The CPU interpreter never contracts, so without this
# option the GPU would compute something other than what the tests check. These kernels are
# bandwidth-bound: separate multiplies and adds cost nothing measurable.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _expm1(a):
    # Kahan's expm1 from exp and log where exp(a) - 1 would cancel (|a| < 1/2), plain
    # exp(a) - 1 elsewhere (no cancellation there, and no log of a denormal u); u = 1 is the
    # formula's 0/0, where expm1(a) = a.
    u = tl.exp(a)
    near = tl.abs(a) < 0.5
    safe_u = tl.where(near & (u != 1.0), u, 2.0)
    kahan = (safe_u - 1.0) * a / tl.log(safe_u)
    return tl.where(near, tl.where(u == 1.0, a, kahan), u - 1.0)


@triton.jit
def _lse_rounding(lse, logprob, x_y, ok, ACC: tl.constexpr):
    """The part of LSE that a saved lse lost to rounding, lse_true = lse + delta, as
    csrc/cpu/row_ops.h (lse_rounding) forms it: delta = (x_y - lse) - logprob from the forward's
    O(1) log-prob, which kept those digits (delta is off by ~an ulp of it). Taken only where
    that is finer than lse's ulp (|logprob| <= |lse| / 2), where it is a rounding (|delta| <=
    |lse| eps: the pair came from one forward) and where `ok`; 0 elsewhere (NaN compares
    false)."""
    if ACC == tl.float64:
        eps = 2.220446049250313e-16
    else:
        eps = 1.1920928955078125e-07
    delta = (x_y - lse) - logprob
    keep = (tl.abs(logprob) <= tl.abs(lse) * 0.5) & (tl.abs(delta) <= tl.abs(lse) * eps)
    return tl.where(ok & keep, delta, 0.0)


@triton.jit
def _merge_topk(topv, x, kidx, cols0, TOPK: tl.constexpr):
    """The TOPK largest of (topv, x): while the chunk still holds a value above the current k-th
    largest, that value replaces it. After the first chunks few values qualify, so the extra work
    per chunk is mostly one max and one compare: the chunk's (max, argmax) is taken once up front
    and again only after a replacement (the loop is unrolled, so a max at the top of each pass
    would be TOPK block reductions per chunk on the GPU even when nothing qualifies)."""
    POS_INF = float("inf")
    cand = x
    kth, slot = tl.min(tl.where(kidx < TOPK, topv, POS_INF), 0, return_indices=True)
    cmax, cidx = tl.max(cand, 0, return_indices=True)
    for _ in tl.static_range(TOPK):
        if cmax > kth:
            topv = tl.where(kidx == slot, cmax, topv)
            cand = tl.where(cols0 == cidx, NEG_INF, cand)
            kth, slot = tl.min(tl.where(kidx < TOPK, topv, POS_INF), 0, return_indices=True)
            cmax, cidx = tl.max(cand, 0, return_indices=True)
    return topv


@triton.jit
def _fold_block(x, m, below, top, ACC: tl.constexpr):
    """One block x of a row (in ACC, -inf padded) folded into the online softmax state
    (m, below, top) of _row_moments. Returns (m_new, below, top, scale, shift, e, d): the new
    state; scale = e^{m - m_new} and shift = m - m_new, with which a caller rebases its own
    sums over the row (0 and 0 while everything so far is -inf: never inf - inf); and per lane
    e = e^{x - m_new} and d = x - m_new (0 at -inf lanes)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    empty = (m_new == NEG_INF) | (m == NEG_INF)
    keep = empty | (m == m_new)
    shift = tl.where(keep, 0.0, m) - tl.where(keep, 0.0, m_new)
    scale = tl.where(empty, 0.0, tl.exp(shift))
    raised = m_new > m
    below = below * scale + tl.where(raised, top * scale, 0.0)
    top = tl.where(raised, 0.0, top)
    same = (x == NEG_INF) | (x == m_new)
    d = tl.where(same, 0.0, x) - tl.where(same, 0.0, m_new)
    e = tl.where(x == NEG_INF, 0.0, tl.exp(d))
    # The maxima are counted apart from the mass below them (see _row_moments).
    at_top = (x == m_new) & (x != NEG_INF)
    below += tl.sum(tl.where(at_top, 0.0, e), 0)
    top += tl.sum(at_top.to(ACC), 0)
    return m_new, below, top, scale, shift, e, d


@triton.jit
def _row_moments(row_ptr, V, inv_temp, WITH_T: tl.constexpr, BLOCK_V: tl.constexpr,
                 ACC: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr):
    """Online softmax moments of one row of x = logits * inv_temp, in ACC.

    Returns (m, below, top, t, n_nan, topv): running max m; the mass strictly below the max,
    sum e^{x - m}, kept apart from the count of maxima `top` so that log s = log1p(top - 1 + below)
    keeps its digits on confident rows; t = sum e^{x - m} (x - m) for the entropy; the TOPK
    largest x (padded with -inf to TOPK_PAD lanes) when TOPK > 0.
    """
    cols0 = tl.arange(0, BLOCK_V)
    kidx = tl.arange(0, TOPK_PAD)
    topv = tl.full((TOPK_PAD,), NEG_INF, ACC)
    m = tl.full((), NEG_INF, ACC)
    below = tl.zeros((), ACC)
    top = tl.zeros((), ACC)
    t = tl.zeros((), ACC)
    n_nan = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        x = tl.load(row_ptr + cols, mask=cols < V, other=NEG_INF).to(ACC) * inv_temp
        n_nan += tl.sum((x != x).to(tl.int32), 0)
        mass = below + top
        m_new, below, top, scale, shift, e, d = _fold_block(x, m, below, top, ACC)
        if WITH_T:
            # Where e^shift underflows the old terms add exactly 0 (csrc/cuda/row_ops.cuh,
            # rebase): shift * (below + top) overflows to -inf for an absurd spread of maxima
            # (-3e38 in one block, 3 in the next), and 0 * -inf would invent a NaN entropy.
            t = tl.where(scale > 0.0, scale * (t + shift * mass), 0.0)
            t += tl.sum(e * tl.where(e == 0.0, 0.0, d), 0)  # 0, not 0 * -inf
        if TOPK > 0:
            topv = _merge_topk(topv, x, kidx, cols0, TOPK)
        m = m_new
    return m, below, top, t, n_nan, topv


@triton.jit
def _log_mass(top, below, finite):
    """(s, log s) of the mass s = top + below that _row_moments keeps apart: log s as
    log1p(s - 1) without cancellation, by Goldberg's identity log1p(u) = log(1 + u) * u /
    ((1 + u) - 1), so a confident row keeps its digits. Rows not `finite` get (1, 0)."""
    s_m1 = tl.where(finite, (top - 1.0) + below, 0.0)
    s = 1.0 + s_m1
    denom = tl.where(s == 1.0, 1.0, s - 1.0)
    return s, tl.where(s == 1.0, s_m1, tl.log(s) * s_m1 / denom)


@triton.jit
def _row_stats(row_ptr, y, V, inv_temp, WITH_T: tl.constexpr, BLOCK_V: tl.constexpr,
               ACC: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
               TOPK_RENORM: tl.constexpr):
    """(lse, log-prob of column y, entropy, top-k entropy) of one row; NaN log-prob/entropy when
    the softmax is undefined (a NaN or +inf logit, or an all -inf row), lse as torch.logsumexp
    gives."""
    m, below, top, t, n_nan, topv = _row_moments(row_ptr, V, inv_temp, WITH_T, BLOCK_V, ACC,
                                                 TOPK, TOPK_PAD)
    finite = (m == m) & (tl.abs(m) != float("inf")) & (n_nan == 0)
    s, log_s = _log_mass(top, below, finite)
    xy = tl.load(row_ptr + y).to(ACC) * inv_temp
    nan = float("nan")
    lse = tl.where(finite, m + log_s, tl.where(n_nan > 0, nan, m))
    logprob = tl.where(finite, (tl.where(finite, xy, 0.0) - tl.where(finite, m, 0.0)) - log_s, nan)
    entropy = tl.where(finite, log_s - t / s, nan)
    topk_entropy = entropy
    if TOPK > 0:
        # -sum_j p_j log p_j over the k largest, p_j = e^{x_j - lse}; padding lanes hold -inf.
        # log p_j is (x_j - m) - log s: x_j - lse would carry lse's rounding (2.4e-4 at
        # |lse| ~ 5e3 in fp32) into every term.
        live = topv != NEG_INF
        logp = (tl.where(live, topv, 0.0) - tl.where(finite, m, 0.0)) - log_s
        p = tl.where(live, tl.exp(logp), 0.0)
        h = -tl.sum(p * logp, 0)
        if TOPK_RENORM:
            mass = tl.sum(p, 0)  # -sum q log q with q = p / mass
            h = h / mass + tl.log(mass)
        topk_entropy = tl.where(finite, h, nan)
    return lse, logprob, entropy, topk_entropy


@triton.jit
def _token_stats_fwd_kernel(
    logits_ptr, scorer_ptr, targets_ptr,
    lse_ptr, logprob_ptr, entropy_ptr, topk_ptr, s_lse_ptr, s_logprob_ptr,
    V, stride_logits, stride_scorer, ignore_index, inv_temp_ptr,
    HAS_SCORER: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    ACC: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, TOPK_RENORM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # 1/temperature comes through memory in ACC: a float argument would be rounded to fp32.
    inv_temp = tl.load(inv_temp_ptr)
    y = tl.load(targets_ptr + row).to(tl.int64)
    valid = y != ignore_index
    # Invalid rows are never read. An out-of-range target (refused by the Python layer, but not
    # while torch.compile traces or with validation off) gets a NaN log-prob, lse and entropy as
    # computed, as the CUDA kernel gives (csrc/cuda/token_stats.cuh); the column read is clamped
    # so that no address outside the row is formed.
    in_range = (y >= 0) & (y < V)
    y_safe = tl.minimum(tl.maximum(y, 0), V - 1)
    zero = tl.zeros((), ACC)
    if valid:
        lse, logprob, ent, topk_ent = _row_stats(
            logits_ptr + row * stride_logits, y_safe, V, inv_temp, WITH_ENTROPY, BLOCK_V, ACC,
            TOPK, TOPK_PAD, TOPK_RENORM)
        tl.store(lse_ptr + row, lse)
        tl.store(logprob_ptr + row, tl.where(in_range, logprob, float("nan")))
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, ent)
        if TOPK > 0:
            tl.store(topk_ptr + row, topk_ent)
        if HAS_SCORER:
            s_lse, s_logprob, _, _ = _row_stats(scorer_ptr + row * stride_scorer, y_safe, V,
                                                inv_temp, False, BLOCK_V, ACC, 0, 1, False)
            tl.store(s_lse_ptr + row, s_lse)
            tl.store(s_logprob_ptr + row, tl.where(in_range, s_logprob, float("nan")))
    else:
        tl.store(lse_ptr + row, zero)
        tl.store(logprob_ptr + row, zero)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, zero)
        if TOPK > 0:
            tl.store(topk_ptr + row, zero)
        if HAS_SCORER:
            tl.store(s_lse_ptr + row, zero)
            tl.store(s_logprob_ptr + row, zero)


@triton.jit
def _load_delta(a_ptr, b_ptr, targets_ptr, idx, end, ignore_index, ACC: tl.constexpr):
    """(inside, valid, a, delta = b - a) for positions idx < end; a = delta = 0 where invalid."""
    inside = idx < end
    y = tl.load(targets_ptr + idx, mask=inside, other=ignore_index)
    valid = inside & (y != ignore_index)
    a = tl.load(a_ptr + idx, mask=valid, other=0.0).to(ACC)
    b = tl.load(b_ptr + idx, mask=valid, other=0.0).to(ACC)
    return inside, valid, a, tl.where(valid, b - a, 0.0)


@triton.jit
def _remit_weights_kernel(
    a_ptr, b_ptr, targets_ptr, cu_ptr, w_ptr, dhat_ptr, loss_ptr, partial_ptr,
    N, ignore_index, band_ptr,
    WRITE_LOSS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """One program per sequence: mu_s, then w = clip(2 sigmoid(delta - mu_s), 1 - eps, 1 + eps),
    and this sequence's partial sums for the diagnostics (reduced over sequences outside)."""
    seg = tl.program_id(0).to(tl.int64)
    # Offsets are clamped into [0, N] and made non-decreasing here, as the CUDA kernel does
    # (csrc/cuda/remit_weights.cuh): the Python layer validates them, but not while torch.compile
    # traces or with validation off, and checking here would need a host synchronisation. A
    # malformed segment reads and writes nothing outside the N tokens.
    begin = tl.minimum(tl.maximum(tl.load(cu_ptr + seg).to(tl.int64), 0), N)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + seg + 1).to(tl.int64), 0), N)
    end = tl.maximum(end, begin)
    offs0 = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), ACC)
    cnt = tl.zeros((BLOCK,), ACC)
    for start in range(begin, end, BLOCK):
        idx = start + offs0
        inside, valid, a, delta = _load_delta(a_ptr, b_ptr, targets_ptr, idx, end, ignore_index,
                                              ACC)
        acc += delta
        cnt += valid.to(ACC)
    n = tl.sum(cnt, 0)
    mu = tl.sum(acc, 0) / tl.maximum(n, 1.0)

    lo = tl.load(band_ptr)  # [1 - eps, 1 + eps] in ACC (see inv_temp above)
    hi = tl.load(band_ptr + 1)
    s_w = tl.zeros((BLOCK,), ACC)
    s_ww = tl.zeros((BLOCK,), ACC)
    n_lo = tl.zeros((BLOCK,), ACC)
    n_hi = tl.zeros((BLOCK,), ACC)
    s_abs = tl.zeros((BLOCK,), ACC)
    for start in range(begin, end, BLOCK):
        idx = start + offs0
        inside, valid, a, delta = _load_delta(a_ptr, b_ptr, targets_ptr, idx, end, ignore_index,
                                              ACC)
        d = tl.where(valid, delta - mu, 0.0)
        e = tl.exp(-tl.abs(d))  # 2 sigmoid(d) without overflow for large |d|
        raw = 2.0 * tl.where(d >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        # NaN must survive the clip (a NaN log-prob poisons its sequence, as in the reference);
        # min/max would drop it, so it is passed around them.
        w = tl.where(raw != raw, raw, tl.minimum(tl.maximum(raw, lo), hi))
        w = tl.where(valid, w, 0.0)
        tl.store(w_ptr + idx, w, mask=inside)
        tl.store(dhat_ptr + idx, d, mask=inside)
        if WRITE_LOSS:
            tl.store(loss_ptr + idx, -(w * a), mask=inside)
        s_w += w
        # (w - 1)^2, not w^2: w sits in [1 - eps, 1 + eps], so the variance taken from shifted
        # moments does not cancel away in fp32.
        s_ww += tl.where(valid, (w - 1.0) * (w - 1.0), 0.0)
        n_lo += (valid & (w <= lo)).to(ACC)
        n_hi += (valid & (w >= hi)).to(ACC)
        s_abs += tl.abs(d)
    # [sum w, sum (w-1)^2, #low, #high, sum |delta_hat|, sum delta, n_valid] of this sequence.
    out = partial_ptr + seg * 7
    tl.store(out + 0, tl.sum(s_w, 0))
    tl.store(out + 1, tl.sum(s_ww, 0))
    tl.store(out + 2, tl.sum(n_lo, 0))
    tl.store(out + 3, tl.sum(n_hi, 0))
    tl.store(out + 4, tl.sum(s_abs, 0))
    tl.store(out + 5, tl.sum(acc, 0))
    tl.store(out + 6, n)


@triton.jit
def _zero_row(out_row, V, cols0, BLOCK_V: tl.constexpr, ACC: tl.constexpr):
    """The gradient row of an ignored position: zeros."""
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        tl.store(out_row + cols, tl.zeros((BLOCK_V,), ACC).to(out_row.dtype.element_ty),
                 mask=cols < V)


@triton.jit
def _ce_bwd_kernel(
    logits_ptr, grad_ptr, targets_ptr, lse_ptr, logprob_ptr, coef_ptr,
    V, stride_logits, stride_grad, ignore_index,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    """grad = coef (softmax - onehot) for one row; the target entry is coef * expm1(log-prob)
    from the forward, never a rounded p_y - 1, the others coef e^{-delta} e^{x - lse} with
    delta the rounding of the saved lse (_lse_rounding), folded into the row's coefficient (an
    element costs what e^{x - lse} did). grad_ptr may equal logits_ptr (in place): x_y and each
    block are read before they are written."""
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(targets_ptr + row).to(tl.int64)
    in_row = logits_ptr + row * stride_logits
    out_row = grad_ptr + row * stride_grad
    cols0 = tl.arange(0, BLOCK_V)
    if y == ignore_index:
        _zero_row(out_row, V, cols0, BLOCK_V, ACC)
    else:
        lse = tl.load(lse_ptr + row)
        coef = tl.load(coef_ptr + row)
        logprob = tl.load(logprob_ptr + row)
        target_grad = coef * _expm1(logprob)
        # An undefined softmax (non-finite lse) gives a NaN row, as the reference does.
        finite = (lse == lse) & (tl.abs(lse) != float("inf"))
        lse = tl.where(finite, lse, 0.0)
        in_range = (y >= 0) & (y < V)
        x_y = tl.load(in_row + tl.minimum(tl.maximum(y, 0), V - 1)).to(ACC)
        coef = coef * tl.exp(-_lse_rounding(lse, logprob, x_y, finite & in_range, ACC))
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            x = tl.load(in_row + cols, mask=mask, other=0.0).to(ACC)
            g = coef * tl.exp(tl.where(finite, x, 0.0) - lse)
            # No column matches an out-of-range target (the stored lanes are [0, V)): its row
            # gets coef * softmax, no one-hot entry, as on CUDA; y is never used as an address.
            g = tl.where(cols == y, target_grad, g)
            g = tl.where(finite, g, float("nan"))
            tl.store(out_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kd_fwd_kernel(
    logits_ptr, teacher_ptr, targets_ptr, loss_ptr, lse_ptr, teacher_lse_ptr,
    V, stride_logits, stride_teacher, ignore_index, inv_temp_ptr,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    """KD against a frozen teacher for one row (METHODS.md section 3; csrc/cpu/kd_loss.cpp is
    the same formula): with x = z / T and q = softmax(x^T), loss = LSE(x) - sum_v q_v x_v
    = log s - dot / s^T, dot = sum_v e^{x^T_v - m^T} (x_v - m), in one pass over both rows.

    Student and teacher keep their own online state (_fold_block); dot follows both maxima: a
    new student max m' moves every term by m - m' (dot += (m - m') s^T, with the teacher mass
    s^T summed so far), a new teacher max rescales it with the teacher's scale. Its terms are
    spread x teacher mass, as in the C++ kernel's dot: they overflow fp32 only for a student
    spread near fp32's range (-1e38 next to 3), where the loss itself is ~1e37."""
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(targets_ptr + row).to(tl.int64)
    zero = tl.zeros((), ACC)
    if y == ignore_index:  # never read
        tl.store(loss_ptr + row, zero)
        tl.store(lse_ptr + row, zero)
        tl.store(teacher_lse_ptr + row, zero)
    else:
        # 1/temperature comes through memory in ACC: a float argument would be rounded to fp32.
        inv_temp = tl.load(inv_temp_ptr)
        z_row = logits_ptr + row * stride_logits
        t_row = teacher_ptr + row * stride_teacher
        cols0 = tl.arange(0, BLOCK_V)
        m = tl.full((), NEG_INF, ACC)
        below = tl.zeros((), ACC)
        top = tl.zeros((), ACC)
        m_t = tl.full((), NEG_INF, ACC)
        below_t = tl.zeros((), ACC)
        top_t = tl.zeros((), ACC)
        dot = tl.zeros((), ACC)
        n_nan = tl.zeros((), tl.int32)
        n_nan_t = tl.zeros((), tl.int32)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            x = tl.load(z_row + cols, mask=mask, other=NEG_INF).to(ACC) * inv_temp
            xt = tl.load(t_row + cols, mask=mask, other=NEG_INF).to(ACC) * inv_temp
            n_nan += tl.sum((x != x).to(tl.int32), 0)
            n_nan_t += tl.sum((xt != xt).to(tl.int32), 0)
            mass_t = below_t + top_t
            m, below, top, _, shift, _, d = _fold_block(x, m, below, top, ACC)
            m_t, below_t, top_t, scale_t, _, e_t, _ = _fold_block(xt, m_t, below_t, top_t, ACC)
            # shift is 0 while the student row is all -inf so far: its terms are then 0 (no
            # teacher mass) or -inf (teacher mass on a -inf logit), and stay so. Where the
            # teacher's scale underflows the old terms count exactly 0, as in the entropy's
            # rebase (_row_moments); a -inf dot times that 0 would be NaN.
            dot = tl.where(scale_t > 0.0, dot + shift * mass_t, 0.0) * scale_t
            # x - m per lane, -inf where the student rules a class out; q_v = 0 contributes 0
            # even there (e_t * -inf would be NaN).
            dx = tl.where(x == NEG_INF, NEG_INF, d)
            dot += tl.sum(e_t * tl.where(e_t == 0.0, 0.0, dx), 0)
        # An undefined softmax on either side (a NaN or +inf logit, an all -inf row) gives a NaN
        # loss, and lse / teacher lse as the C++ kernel reports them: the row's max (NaN where it
        # holds a NaN), which the backward reads as "NaN row".
        finite = (m == m) & (tl.abs(m) != float("inf")) & (n_nan == 0)
        finite_t = (m_t == m_t) & (tl.abs(m_t) != float("inf")) & (n_nan_t == 0)
        ok = finite & finite_t
        s, log_s = _log_mass(top, below, ok)
        s_t, log_s_t = _log_mass(top_t, below_t, ok)
        nan = float("nan")
        # LSE(x) - sum q x = log s - sum q (x - m); dot = -inf (q > 0 where x = -inf) gives +inf.
        tl.store(loss_ptr + row, tl.where(ok, log_s - dot / s_t, nan))
        tl.store(lse_ptr + row, tl.where(ok, m + log_s, tl.where(n_nan > 0, nan, m)))
        tl.store(teacher_lse_ptr + row,
                 tl.where(ok, m_t + log_s_t, tl.where(n_nan_t > 0, nan, m_t)))


@triton.jit
def _kd_bwd_kernel(
    logits_ptr, teacher_ptr, grad_ptr, targets_ptr, lse_ptr, teacher_lse_ptr, coef_ptr,
    V, stride_logits, stride_teacher, stride_grad, ignore_index, inv_temp_ptr,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    """grad = coef / T (softmax(x) - softmax(x^T)) for one row, from the forward's lse and
    teacher lse; zeros at an ignored row, a NaN row where either softmax is undefined."""
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(targets_ptr + row).to(tl.int64)
    out_row = grad_ptr + row * stride_grad
    cols0 = tl.arange(0, BLOCK_V)
    if y == ignore_index:
        _zero_row(out_row, V, cols0, BLOCK_V, ACC)
    else:
        inv_temp = tl.load(inv_temp_ptr)
        z_row = logits_ptr + row * stride_logits
        t_row = teacher_ptr + row * stride_teacher
        lse = tl.load(lse_ptr + row)
        lse_t = tl.load(teacher_lse_ptr + row)
        c = tl.load(coef_ptr + row) * inv_temp  # d(z / T)/dz = 1/T
        finite = ((lse == lse) & (tl.abs(lse) != float("inf")) & (lse_t == lse_t)
                  & (tl.abs(lse_t) != float("inf")))
        lse = tl.where(finite, lse, 0.0)
        lse_t = tl.where(finite, lse_t, 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            x = tl.load(z_row + cols, mask=mask, other=0.0).to(ACC) * inv_temp
            xt = tl.load(t_row + cols, mask=mask, other=0.0).to(ACC) * inv_temp
            p = tl.exp(tl.where(finite, x, 0.0) - lse)
            q = tl.exp(tl.where(finite, xt, 0.0) - lse_t)
            g = tl.where(finite, (p - q) * c, float("nan"))
            tl.store(out_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pg_terms_kernel(
    logprob_ptr, targets_ptr, adv_ptr, scale_ptr, old_ptr, ref_ptr, coefs_ptr,
    loss_ptr, dlogprob_ptr, N, ignore_index,
    HAS_SCALE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """The pg_loss epilogue for BLOCK tokens (METHODS.md section 4; csrc/pg_terms.h is the same
    formula): loss_t = scale_t (pg_t + kl_beta kl_t) and dlogprob_t = d loss_t / d a_t from the
    statistics pass's a_t; zeros at ignored positions."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    y = tl.load(targets_ptr + offs, mask=inside, other=ignore_index).to(tl.int64)
    valid = inside & (y != ignore_index)
    a = tl.load(logprob_ptr + offs, mask=inside, other=0.0).to(ACC)
    adv = tl.load(adv_ptr + offs, mask=inside, other=0.0).to(ACC)
    # [1 - clip_low, 1 + clip_high, kl_beta] come through memory in ACC (a float argument would
    # be rounded to fp32, off the fp64 references' band).
    lo = tl.load(coefs_ptr)
    hi = tl.load(coefs_ptr + 1)
    kl_beta = tl.load(coefs_ptr + 2)
    if HAS_OLD:
        ratio = tl.exp(a - tl.load(old_ptr + offs, mask=inside, other=0.0).to(ACC))
        # -min(rho A, clip(rho) A) as a select (csrc/pg_terms.h): the clipped branch, slope 0,
        # where the ratio left the band on the side the advantage's sign rewards, rho A
        # elsewhere. Not min(): rho = inf (old = -inf) times A = 0 is NaN. A = 0 goes to the
        # clipped side (`>=`), an exact 0; clip_frac does not count it. A NaN ratio stays NaN.
        active = ((adv >= 0) & (ratio > hi)) | ((adv < 0) & (ratio < lo))
        loss = tl.where(active, -(tl.where(ratio > hi, hi, lo) * adv), -(ratio * adv))
        dlogprob = tl.where(active, 0.0, -ratio * adv)
    else:
        loss = -adv * a
        dlogprob = -adv
    if HAS_REF:
        # k3 as expm1(d) - d: keeps its digits while |d| = |ref - a| is small.
        d = tl.load(ref_ptr + offs, mask=inside, other=0.0).to(ACC) - a
        em1 = _expm1(d)
        loss = loss + kl_beta * (em1 - d)
        dlogprob = dlogprob - kl_beta * em1
    if HAS_SCALE:
        s = tl.load(scale_ptr + offs, mask=inside, other=0.0).to(ACC)
        loss = loss * s
        dlogprob = dlogprob * s
    tl.store(loss_ptr + offs, tl.where(valid, loss, 0.0), mask=inside)
    tl.store(dlogprob_ptr + offs, tl.where(valid, dlogprob, 0.0), mask=inside)
