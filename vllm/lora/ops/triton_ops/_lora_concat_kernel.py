"""Private ``@triton.jit`` body of the dense LoRA's concatenated shrink (launcher: ``lora_concat.py``).

``lora_concat_shrink_kernel`` - grid (cdiv(T, BLOCK_M), NUM_SL + cdiv(K, BLOCK_K)) with NUM_SL = S * L / G:
program (m, j < NUM_SL) multiplies rows m*BLOCK_M.. of x by the A of G slots of one slice (slice s = j // (L / G),
slots g*G.. with g = j % (L / G); every rank column of the buffer: BLOCK_N = next power of two of G * R) and
stores the product into the wide input's columns ``K + (s * L + l) * R ..`` of each of those slots l, for the rows
whose slot is l, zeros for the others; program (m, NUM_SL + i) copies K tile i of the x rows into the wide
input's first K columns (apart from the K loops: no program of the dot carries the copy's stores).  So every element
of ``out[:T]`` is written once per launch (nothing of an earlier step survives), and the projection's GEMM on the
wide input and the wide weight ``[W | B]`` adds each row's own slot's delta and nothing else.  G = 1 reads x once
per (slice, slot); G = L once per slice, with one wider dot.
"""
import triton
import triton.language as tl

from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def lora_concat_shrink_kernel(
    x_ptr, a_ptr, mapping_ptr, out_ptr,
    T, K, L, R,
    stride_xt, stride_xk,
    stride_as, stride_al, stride_ar, stride_ak,
    stride_ot, stride_ok,
    NUM_SL, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr = False, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    pid_m = tl.program_id(0)
    j = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = rows < T
    if j >= NUM_SL:  # the copy of x, one K tile a program (one round trip)
        offs_k = (j - NUM_SL) * BLOCK_K + tl.arange(0, BLOCK_K)
        xm = mask_m[:, None] & (offs_k < K)[None, :]
        xt = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk, mask=xm, other=0.0)
        tl.store(out_ptr + rows[:, None] * stride_ot + offs_k[None, :] * stride_ok, xt, mask=xm)
        return
    groups = L // G
    s = j // groups
    first = (j % groups) * G  # the group's first slot
    offs_n = tl.arange(0, BLOCK_N)  # column n: slot first + n // R, rank n % R
    mask_n = offs_n < G * R
    n_slot = first + offs_n // R
    row_slot = tl.load(mapping_ptr + rows, mask=mask_m, other=-1)
    a_cols = a_ptr + s.to(tl.int64) * stride_as + n_slot.to(tl.int64) * stride_al + (offs_n % R) * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_cols[None, :] + offs_k[:, None] * stride_ak, mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        if UPCAST:  # the interpreter's dot multiplies bf16 bit patterns (FACTS.md 7)
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32))
        else:
            acc += tl.dot(xt, at)
    acc = tl.where(row_slot[:, None] == n_slot[None, :], acc, 0.0)
    cols = K + (s * L + first) * R + offs_n
    tl.store(out_ptr + rows[:, None] * stride_ot + cols[None, :] * stride_ok, acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])
