"""Attention of 1..K+1 new query tokens against a slotted KV cache (decode / verify / chunked prefill).

q [B, T, Hq, D]; k_cache, v_cache [n_slots, Hkv, S_max, D]; slots [B]; positions [B, T] (cache
positions of the queries, whose K/V are already written). Query t of row b sees key n of slot
slots[b] when n <= positions[b, t]; with a tree mask [B, T, T] (bool), a key inside the step,
n = positions[b, 0] + j with 0 <= j < T, is visible only where tree_mask[b, t, j] as well (a tree
step's positions are contiguous: positions[b] = p0, p0 + 1, ..., p0 + T - 1). A query with a
negative position sees nothing and its output is 0 (padding). GQA: Hq is a multiple of Hkv.
With a prefix reference [B, 2] int (prefix slot, prefix length), row b reads its keys and values at
positions n < prefix[b, 1] from slot prefix[b, 0] (a persona prefix shared by many rows) and the
rest from its own slot; length 0 means no prefix.

The Triton version is flash-decoding: the key range [0, max_len) is cut into splits processed in
parallel, each writing a partial output and its log-sum-exp, then a second kernel combines them.
The launch grid depends only on shapes and `max_len` (a host int, e.g. the bucket of the CUDA graph);
each program reads the real lengths from `positions`, so there is no host sync.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from kernels.prefix import prefix_rows


def _check(q, k_cache, v_cache, slots, positions, tree_mask, prefix=None):
    B, T, Hq, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape[3] != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"attention: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} "
                         f"must be [n_slots, Hkv, S_max, {D}]")
    if Hq % k_cache.shape[1]:
        raise ValueError(f"attention: query heads ({Hq}) must be a multiple of kv heads ({k_cache.shape[1]})")
    if positions.shape != (B, T) or slots.shape != (B,):
        raise ValueError(f"attention: positions {tuple(positions.shape)} must be [{B}, {T}], "
                         f"slots {tuple(slots.shape)} [{B}]")
    if not slots.is_contiguous():
        raise ValueError("attention: slots must be contiguous")
    if tree_mask is not None and (tree_mask.shape != (B, T, T) or tree_mask.dtype != torch.bool):
        raise ValueError(f"attention: tree_mask must be bool [{B}, {T}, {T}], "
                         f"got {tree_mask.dtype} {tuple(tree_mask.shape)}")
    if prefix is not None and (prefix.shape != (B, 2) or prefix.dtype.is_floating_point):
        raise ValueError(f"attention: prefix must be integer [{B}, 2] (slot, length), "
                         f"got {prefix.dtype} {tuple(prefix.shape)}")


def visible_keys(positions: torch.Tensor, tree_mask: torch.Tensor | None, n_keys: int) -> torch.Tensor:
    """[B, T, n_keys] bool: which cache positions each query attends to."""
    n = torch.arange(n_keys, device=positions.device)
    visible = n <= positions[:, :, None]
    if tree_mask is not None:
        T = positions.shape[1]
        j = n - positions[:, :1, None]  # [B, 1, n_keys]: index inside the step
        in_step = (j >= 0) & (j < T)
        tree = torch.gather(tree_mask, 2, j.clamp(0, T - 1).expand(-1, T, -1))
        visible &= ~in_step | tree
    return visible


def gather_rows(cache: torch.Tensor, slots: torch.Tensor, prefix: torch.Tensor | None, n: int) -> torch.Tensor:
    """[B, Hkv, n, D]: the first n entries of each row, positions below its prefix length from its prefix slot."""
    if prefix is None:
        return cache[slots, :, :n]
    j = torch.arange(n, device=cache.device)
    return cache[prefix_rows(slots, j, prefix), :, j].transpose(1, 2)


def cached_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    max_len: int | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    _check(q, k_cache, v_cache, slots, positions, tree_mask, prefix)
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    L = k_cache.shape[2] if max_len is None else min(max_len, k_cache.shape[2])
    k = gather_rows(k_cache, slots, prefix, L).float()  # [B, Hkv, L, D]
    v = gather_rows(v_cache, slots, prefix, L).float()
    qg = q.float().reshape(B, T, Hkv, Hq // Hkv, D)
    scores = torch.einsum("bthgd,bhnd->bhgtn", qg, k) / math.sqrt(D)
    visible = visible_keys(positions, tree_mask, L)[:, None, None]  # [B, 1, 1, T, L]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.where(visible.any(-1, keepdim=True), probs, 0.0)
    out = torch.einsum("bhgtn,bhnd->bthgd", probs, v)
    return out.reshape(B, T, Hq, D).to(q.dtype)


@triton.jit
def _attn_split_kernel(
    Q, K, V, Slots, Pos, Tree, Prefix, PartO, PartL,
    sq_b, sq_t, sq_h, sk_n, sk_h, sk_s, sv_n, sv_h, sv_s,
    sp_b, sp_t, st_b, st_i, st_j, sx_b, sx_c,
    T, Hq, Hkv, S_max, n_splits, split_size, qk_scale,
    G: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_TREE: tl.constexpr, HAS_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    b = (tl.program_id(1) // Hkv).to(tl.int64)
    kvh = tl.program_id(1) % Hkv
    # Rows of this tile are (query t, head g of the kv group), row = t * G + g.
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // G
    hq = kvh * G + rows % G
    row_ok = t < T
    pos = tl.load(Pos + b * sp_b + t * sp_t, mask=row_ok, other=-1).to(tl.int32)
    p0 = tl.load(Pos + b * sp_b).to(tl.int32)
    slot = tl.load(Slots + b).to(tl.int64)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + b * sq_b + t[:, None] * sq_t + hq[:, None] * sq_h + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    start = split * split_size
    end = tl.minimum(tl.minimum(start + split_size, tl.max(pos, axis=0) + 1), S_max)
    k_base = K + slot * sk_n + kvh * sk_h
    v_base = V + slot * sv_n + kvh * sv_h
    if HAS_PREFIX:
        prefix_slot = tl.load(Prefix + b * sx_b).to(tl.int64)
        prefix_len = tl.load(Prefix + b * sx_b + sx_c).to(tl.int32)
        k_prefix = K + prefix_slot * sk_n + kvh * sk_h
        v_prefix = V + prefix_slot * sv_n + kvh * sv_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (n < end)[:, None] & d_ok[None, :]
        k_ptr = k_base + n[:, None] * sk_s + d[None, :]
        v_ptr = v_base + n[:, None] * sv_s + d[None, :]
        if HAS_PREFIX:  # per key: the shared prefix slot below the prefix length, the row's own slot after
            in_prefix = (n < prefix_len)[:, None]
            k_ptr = tl.where(in_prefix, k_prefix + n[:, None] * sk_s + d[None, :], k_ptr)
            v_ptr = tl.where(in_prefix, v_prefix + n[:, None] * sv_s + d[None, :], v_ptr)
        k = tl.load(k_ptr, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=DOT_PRECISION) * qk_scale
        visible = n[None, :] <= pos[:, None]
        if HAS_TREE:
            j = n[None, :] - p0
            in_step = (j >= 0) & (j < T)
            tree = tl.load(Tree + b * st_b + t[:, None] * st_i + j * st_j, mask=in_step & row_ok[:, None], other=0)
            visible = visible & ((~in_step) | (tree != 0))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0
    lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    # Partials are [B, T, Hq, n_splits, (D)], contiguous.
    part = ((b * T + t) * Hq + hq).to(tl.int64) * n_splits + split
    tl.store(PartL + part, lse, mask=row_ok)
    tl.store(PartO + part[:, None] * D + d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_combine_kernel(
    PartO, PartL, Out, n_splits,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b, t, hq) flattened; Out is contiguous [B, T, Hq, D]
    d = tl.arange(0, BLOCK_D)
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < n_splits
        lse = tl.load(PartL + row * n_splits + s, mask=s_ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse - m_safe)
        o = tl.load(PartO + (row * n_splits + s[:, None]) * D + d[None, :],
                    mask=(s_ok & (w > 0))[:, None] & (d < D)[None, :], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, axis=0)
        total = total * alpha + tl.sum(w, axis=0)
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(Out + row * D + d, out.to(Out.dtype.element_ty), mask=d < D)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_size(n_keys: int, programs_per_split: int, device: torch.device) -> int:
    """Keys per split: enough splits to give every SM about two programs (at most 64 splits,
    at least 64 keys each)."""
    splits_wanted = min(64, triton.cdiv(2 * _sm_count(device), programs_per_split))
    return max(64, triton.cdiv(triton.cdiv(n_keys, splits_wanted), 64) * 64)


def cached_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    max_len: int | None = None,
    split_size: int | None = None,
    out: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """`max_len` bounds every position + 1 (default S_max); `split_size` (a multiple of 16) overrides
    the keys-per-split heuristic; `out` (contiguous [B, T, Hq, D]) receives the result."""
    _check(q, k_cache, v_cache, slots, positions, tree_mask, prefix)
    B, T, Hq, D = q.shape
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    if out is None:
        out = q.new_empty(q.shape)
    elif out.shape != q.shape or not out.is_contiguous():
        raise ValueError(f"attention: out must be contiguous {tuple(q.shape)}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"attention: {name} must be contiguous in its last dimension")
    if B * T == 0:
        return out
    n_keys = S_max if max_len is None else min(max_len, S_max)
    block_m = max(16, min(64, triton.next_power_of_2(T * G)))
    m_tiles = triton.cdiv(T * G, block_m)
    if split_size is None:
        split_size = _split_size(n_keys, B * Hkv * m_tiles, q.device)
    elif split_size <= 0 or split_size % 16:
        raise ValueError(f"attention: split_size {split_size} must be a positive multiple of 16")
    # fp32 runs exact (non tensor-core) dots: smaller key tiles keep it out of register spills.
    block_n = next(bn for bn in ((32, 16) if q.dtype == torch.float32 else (64, 32, 16)) if split_size % bn == 0)
    n_splits = triton.cdiv(n_keys, split_size)
    part_o = torch.empty((B, T, Hq, n_splits, D), dtype=torch.float32, device=q.device)
    part_l = torch.empty((B, T, Hq, n_splits), dtype=torch.float32, device=q.device)
    tree = positions if tree_mask is None else tree_mask.view(torch.uint8)  # dummy pointers when absent
    prefix_ref = positions if prefix is None else prefix
    block_d = max(16, triton.next_power_of_2(D))
    _attn_split_kernel[(n_splits, B * Hkv, m_tiles)](
        q, k_cache, v_cache, slots, positions, tree, prefix_ref, part_o, part_l,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        positions.stride(0), positions.stride(1),
        tree.stride(0), tree.stride(1), tree.stride(-1), prefix_ref.stride(0), prefix_ref.stride(1),
        T, Hq, Hkv, S_max, n_splits, split_size, math.log2(math.e) / math.sqrt(D),
        G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_TREE=tree_mask is not None, HAS_PREFIX=prefix is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=8 if q.dtype == torch.float32 else 4, num_stages=2,
    )
    _attn_combine_kernel[(B * T * Hq,)](
        part_o, part_l, out, n_splits,
        D=D, BLOCK_S=max(2, min(64, triton.next_power_of_2(n_splits))), BLOCK_D=block_d, num_warps=4,
    )
    return out


def cached_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    max_len: int | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """-> [B, T, Hq, D] in q's dtype, softmax scale 1/sqrt(D)."""
    if q.is_cuda:
        return cached_attention_triton(q, k_cache, v_cache, slots, positions, tree_mask, max_len, prefix=prefix)
    return cached_attention_reference(q, k_cache, v_cache, slots, positions, tree_mask, max_len, prefix)
