// Hopper's warpgroup MMA (wgmma, sm_90a only) for the 4-bit MoE GEMM's wide blocks (w4_mma_moe.cuh): the four
// warps of a warpgroup each hold their 16 output channels' decoded A fragment in registers (the m16n8k16
// layout), and the block's tokens are ONE shared-memory B operand for all four, read by the tensor cores
// (no ldmatrix through registers: a quarter of the shared-memory reads of one mma.sync per warp).
//
// The B tile (BM tokens x 16 inputs per k16 step, K-major, no swizzle) is stored as 8 x 8 "core matrices"
// of 128 contiguous bytes: input chunk c (8 inputs) of token r at byte (c * BM + r) * 16 of the stage's
// activation area, so core matrices adjacent in K are BM * 16 bytes apart (the descriptor's leading byte
// offset) and those adjacent in N 128 bytes (its stride byte offset).  The accumulator fragment per n8
// column tile is the m16n8k16 C fragment, so the epilogue is the mma.sync path's.
#pragma once
#include <stdint.h>

#include <type_traits>

#include "w4_mma_ptx.cuh"

#ifndef W4_MMA_WGMMA  // 1: blocks of 32+ rows run wgmma on sm_90a; 0: mma.sync everywhere (a variant to time)
#define W4_MMA_WGMMA 1
#endif

namespace {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && W4_MMA_WGMMA
constexpr bool kWgmmaBuilt = true;
#else
constexpr bool kWgmmaBuilt = false;
#endif

// the shared-memory matrix descriptor: start address, leading (K) and stride (N) byte offsets, no swizzle
#ifndef W4_WGMMA_SWAP_OFFSETS  // 1: the K stride in the stride field and the N stride in the leading one (a check)
#define W4_WGMMA_SWAP_OFFSETS 0
#endif
__device__ __forceinline__ uint64_t wgmma_desc(const void* smem, uint32_t k_stride, uint32_t n_stride) {
  const uint64_t addr = smem_addr(smem);
  const uint64_t lead = W4_WGMMA_SWAP_OFFSETS ? n_stride : k_stride;
  const uint64_t stride = W4_WGMMA_SWAP_OFFSETS ? k_stride : n_stride;
  return ((addr & 0x3FFFF) >> 4) | ((lead >> 4) << 16) | ((stride >> 4) << 32);
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_wait_all() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
// after a wait: the compiler must treat the accumulators as written here, and keep the A registers the
// in-flight MMAs read alive until here
template <int NT>
__device__ __forceinline__ void wgmma_settle(float (&d)[NT][4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+f"(d[n][i])::"memory");
}
__device__ __forceinline__ void wgmma_keep(uint32_t (&a)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[i])::"memory");
}

// d (64 x 8 NT, this warp's 16 rows) += a (this warp's 16 x 16 A fragment) * the B tile at desc; TY: the PTX type
// of the operands (bf16 / f16), N: the tokens (8 NT)
#define W4_WGMMA_N16(TY) \
  asm volatile( \
      "{\n.reg .pred acc;\nsetp.ne.b32 acc, %13, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n16k16.f32." TY "." TY " {" \
      "%0,%1,%2,%3,%4,%5,%6,%7" \
      "}, {%8,%9,%10,%11}, %12, acc, 1, 1, 0;\n}\n" \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), \
          "+f"(d[1][2]), "+f"(d[1][3]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1) \
      : "memory")
#define W4_WGMMA_N32(TY) \
  asm volatile( \
      "{\n.reg .pred acc;\nsetp.ne.b32 acc, %21, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " {" \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15" \
      "}, {%16,%17,%18,%19}, %20, acc, 1, 1, 0;\n}\n" \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), \
          "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1) \
      : "memory")
#define W4_WGMMA_N64(TY) \
  asm volatile( \
      "{\n.reg .pred acc;\nsetp.ne.b32 acc, %37, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {" \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31" \
      "}, {%32,%33,%34,%35}, %36, acc, 1, 1, 0;\n}\n" \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), \
          "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), \
          "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), \
          "+f"(d[7][2]), "+f"(d[7][3]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1) \
      : "memory")

// the first NT n8 token tiles of d (N >= NT of them; NT 2 / 4 / 8: n16 / n32 / n64, W4_SKIP_PAD's partial
// blocks use the smaller ones) += a * the B tile at desc, for bf16 or fp16 operands
template <typename T, int NT>
struct Wgmma {
  static_assert(NT == 2 || NT == 4 || NT == 8, "wgmma token tiles: n16, n32 or n64");
  template <int N>
  __device__ static void run(float (&d)[N][4], const uint32_t (&a)[4], uint64_t desc) {
    static_assert(N >= NT, "accumulators for every token tile written");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr bool kHalf = std::is_same<T, __half>::value;
    if constexpr (NT == 2) {
      if constexpr (kHalf) W4_WGMMA_N16("f16"); else W4_WGMMA_N16("bf16");
    } else if constexpr (NT == 4) {
      if constexpr (kHalf) W4_WGMMA_N32("f16"); else W4_WGMMA_N32("bf16");
    } else {
      if constexpr (kHalf) W4_WGMMA_N64("f16"); else W4_WGMMA_N64("bf16");
    }
#endif
  }
};

#undef W4_WGMMA_N16
#undef W4_WGMMA_N32
#undef W4_WGMMA_N64

}  // namespace
