"""Fused rotary embedding (Hugging Face `rotate_half` convention) + KV-cache write.

For token (b, t) at rotary position p = positions[b, t], with c = cos[p, :D/2], s = sin[p, :D/2]
and x = [x1, x2] split into halves of the head dim:
    rope(x) = [x1 * c - x2 * s, x2 * c + x1 * s]
The rotated q is returned; rope(k) and v are written to cache[slots[b], :, w] where
w = cache_positions[b, t] (default: positions[b, t]). Tree drafts pass both: siblings share a
rotary position (their depth) but need distinct cache rows.

A negative position marks a padding token: its K/V are not written (its q is rotated as position 0).
Write positions must be < S_max and distinct per slot.
"""

import torch
import triton
import triton.language as tl


def _check(q, k, v, cos, sin, positions, slots, k_cache, v_cache, cache_positions):
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if D % 2:
        raise ValueError(f"rope: head dim {D} must be even")
    if k.shape != (B, T, Hkv, D) or v.shape != k.shape:
        raise ValueError(f"rope: k {tuple(k.shape)} / v {tuple(v.shape)} must be [{B}, {T}, Hkv, {D}]")
    if k_cache.dim() != 4 or k_cache.shape[1] != Hkv or k_cache.shape[3] != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"rope: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} "
                         f"must be [n_slots, {Hkv}, S_max, {D}]")
    if cos.dim() != 2 or cos.shape[1] not in (D // 2, D) or sin.shape != cos.shape:
        raise ValueError(f"rope: cos/sin {tuple(cos.shape)} must be [S, {D // 2}] or [S, {D}]")
    if positions.shape != (B, T) or slots.shape != (B,):
        raise ValueError(f"rope: positions {tuple(positions.shape)} must be [{B}, {T}], "
                         f"slots {tuple(slots.shape)} [{B}]")
    if not slots.is_contiguous():
        raise ValueError("rope: slots must be contiguous")
    if cache_positions is not None and cache_positions.shape != (B, T):
        raise ValueError(f"rope: cache_positions {tuple(cache_positions.shape)} must be [{B}, {T}]")


def rope_kv_write_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    _check(q, k, v, cos, sin, positions, slots, k_cache, v_cache, cache_positions)
    half = q.shape[-1] // 2
    rot_pos = positions.clamp(min=0)
    c = cos[rot_pos, :half].float().unsqueeze(2)  # [B, T, 1, D/2]
    s = sin[rot_pos, :half].float().unsqueeze(2)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().split(half, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    write_pos = positions if cache_positions is None else cache_positions
    b, t = torch.nonzero(write_pos >= 0, as_tuple=True)
    k_cache[slots[b], :, write_pos[b, t]] = rotate(k)[b, t].to(k_cache.dtype)
    v_cache[slots[b], :, write_pos[b, t]] = v[b, t].to(v_cache.dtype)
    return rotate(q)


@triton.jit
def _rotate_store(src, dst_ptr, d, mask, HALF, c, s):
    x1 = tl.load(src + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)
    ty = dst_ptr.dtype.element_ty
    tl.store(dst_ptr + d[None, :], (x1 * c - x2 * s).to(ty), mask=mask)
    tl.store(dst_ptr + HALF + d[None, :], (x2 * c + x1 * s).to(ty), mask=mask)


@triton.jit
def _rope_kv_write_kernel(
    Q, K, V, Cos, Sin, Pos, WPos, Slots, QOut, KCache, VCache,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
    sc_s, sp_b, sp_t, sw_b, sw_t,
    sqo_b, sqo_t, sqo_h,
    skc_n, skc_h, skc_s, svc_n, svc_h, svc_s,
    T, Hq, Hkv, S_max,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    pos = tl.load(Pos + b * sp_b + t * sp_t)
    wpos = tl.load(WPos + b * sw_b + t * sw_t)
    slot = tl.load(Slots + b).to(tl.int64)

    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF
    rot = tl.maximum(pos, 0)
    c = tl.load(Cos + rot * sc_s + d, mask=d_ok, other=1.0).to(tl.float32)[None, :]
    s = tl.load(Sin + rot * sc_s + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]

    hq = tl.arange(0, BLOCK_HQ)
    _rotate_store(Q + b * sq_b + t * sq_t + hq[:, None] * sq_h,
                  QOut + b * sqo_b + t * sqo_t + hq[:, None] * sqo_h,
                  d, (hq[:, None] < Hq) & d_ok[None, :], HALF, c, s)

    hk = tl.arange(0, BLOCK_HKV)
    # Padding tokens (and out-of-range rows) write no head.
    heads_written = tl.where((wpos >= 0) & (wpos < S_max), Hkv, 0)
    k_mask = (hk[:, None] < heads_written) & d_ok[None, :]
    _rotate_store(K + b * sk_b + t * sk_t + hk[:, None] * sk_h,
                  KCache + slot * skc_n + hk[:, None] * skc_h + wpos * skc_s,
                  d, k_mask, HALF, c, s)

    dv = tl.arange(0, BLOCK_D)
    v_mask = (hk[:, None] < heads_written) & (dv[None, :] < 2 * HALF)
    v = tl.load(V + b * sv_b + t * sv_t + hk[:, None] * sv_h + dv[None, :], mask=v_mask, other=0.0)
    tl.store(VCache + slot * svc_n + hk[:, None] * svc_h + wpos * svc_s + dv[None, :],
             v.to(VCache.dtype.element_ty), mask=v_mask)


def rope_kv_write_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_positions: torch.Tensor | None = None,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q, k, v may be strided views (e.g. slices of a fused qkv projection); the head dim must be contiguous."""
    _check(q, k, v, cos, sin, positions, slots, k_cache, v_cache, cache_positions)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    q_out = q.new_empty(q.shape) if q_out is None else q_out
    wpos = positions if cache_positions is None else cache_positions
    for name, x in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("q_out", q_out),
                    ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"rope: {name} must be contiguous in its last dimension")
    if cos.stride() != sin.stride():
        raise ValueError("rope: cos and sin must have the same strides")
    if B * T == 0:
        return q_out
    _rope_kv_write_kernel[(B * T,)](
        q, k, v, cos, sin, positions, wpos, slots, q_out, k_cache, v_cache,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        cos.stride(0), positions.stride(0), positions.stride(1), wpos.stride(0), wpos.stride(1),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        T, Hq, Hkv, k_cache.shape[2],
        HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(D // 2), BLOCK_D=triton.next_power_of_2(D),
        BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HKV=triton.next_power_of_2(Hkv),
        num_warps=4,
    )
    return q_out


def rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns rope(q); writes rope(k) and v into the caches."""
    impl = rope_kv_write_triton if q.is_cuda else rope_kv_write_reference
    return impl(q, k, v, cos, sin, positions, slots, k_cache, v_cache, cache_positions)
