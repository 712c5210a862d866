// The PTX-level pieces of the tensor-core 4-bit MoE GEMM (w4_mma_moe.cuh): the MMA and the float helpers per
// activation dtype, cp.async / ldmatrix wrappers, and the two formats' register decodes.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr uint32_t kMxMul = 0x7E807E80u;  // bf16 2^126 in both halves: the MXFP4 decode's multiplier

template <typename T>
struct Act;
template <>
struct Act<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 2^7 in both halves: 128 + q
  static constexpr float kBias = 128.f;
  __device__ static uint32_t pair(float v) {
    __nv_bfloat162 h = __floats2bfloat162_rn(v, v);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static uint32_t sub(uint32_t x, uint32_t y) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&x), *reinterpret_cast<__nv_bfloat162*>(&y));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static uint32_t mul(uint32_t x, uint32_t y) {
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&x), *reinterpret_cast<__nv_bfloat162*>(&y));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct Act<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // fp16 2^10 in both halves: 1024 + q
  static constexpr float kBias = 1024.f;
  __device__ static uint32_t pair(float v) {
    __half2 h = __floats2half2_rn(v, v);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static uint32_t sub(uint32_t x, uint32_t y) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&x), *reinterpret_cast<__half2*>(&y));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static uint32_t mul(uint32_t x, uint32_t y) {
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&x), *reinterpret_cast<__half2*>(&y));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; with pred false nothing is read and the 16 bytes are zero-filled
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// B fragments of one / two n8 tiles (tokens) x 16 inputs: matrix i of the load takes its 8 row addresses from
// lanes 8i..8i+7, and lane 4g + t gets row g, columns 2t, 2t+1 of each: the m16n8k16 B fragment of a
// token-major tile
__device__ __forceinline__ void ldsm_x2(uint32_t& r0, uint32_t& r1, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(smem_addr(p))
               : "memory");
}
__device__ __forceinline__ void ldsm_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(p))
               : "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ uint32_t rotr(uint32_t w, int s) { return __funnelshift_r(w, w, s); }

// The four MXFP4 A registers of one word, * 2^-126 before the HMUL2 (bit table: ops/mxfp4_mma_layout.py):
// registers 0 and 1 are the word rotated right by 26 / 29 under the mask of bf16 bits {15, 8, 7, 6} of
// both halves; registers 2 and 3 take their magnitude bits {8, 7, 6} from rotations by 0 / 7 and their
// sign bits from rotations by 27 / 28.  The HMUL2 multiplies registers 0 / 2 (row g) by mul_lo and 1 / 3
// (row g + 8) by mul_hi: 2^126, or with the group's scale folded in, 2^(s - 1).
__device__ __forceinline__ void decode_mx(uint32_t w, uint32_t mul_lo, uint32_t mul_hi, uint32_t (&af)[4]) {
  constexpr uint32_t kAll = 0x81C081C0u, kMag = 0x01C001C0u, kSign = 0x80008000u;
  const uint32_t r[4] = {rotr(w, 26) & kAll, rotr(w, 29) & kAll, (w & kMag) | (rotr(w, 27) & kSign),
                         (rotr(w, 7) & kMag) | (rotr(w, 28) & kSign)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t mul = i % 2 ? mul_hi : mul_lo;
    __nv_bfloat162 h = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&r[i]),
                               *reinterpret_cast<const __nv_bfloat162*>(&mul));
    af[i] = *reinterpret_cast<uint32_t*>(&h);
  }
}

// e8m0 exponent -> 2^(s - 127) in fp32 (0: the subnormal 2^-127)
__device__ __forceinline__ float e8m0_to_float(uint8_t s) {
  return __uint_as_float(s == 0 ? 0x00400000u : static_cast<uint32_t>(s) << 23);
}

// (w & 0x000F000F) | magic in one LOP3 (written out: the compiler splits an AND and an OR of two immediates)
__device__ __forceinline__ uint32_t lop_nibbles(uint32_t w, uint32_t magic) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(w), "n"(0x000F000F), "r"(magic));
  return r;
}

}  // namespace
