// The int4 (W4A16) entry of the tensor-core 4-bit MoE GEMM (kernel: w4_mma_moe.cuh).
#include "w4_mma_launch.cuh"

#ifndef W4_INT4_FOLD  // 1: blocks of 32+ rows fold the group scale into the decode (w4_mma_moe.cuh's FOLD: no per-group
#define W4_INT4_FOLD 0  // fp32 sums, so 64-row blocks take the warpgroup MMA too); a variant to time
#endif

namespace {

template <typename T, int BM, bool HAS_ZEROS>
cudaError_t by_group(const Args& p, int bk, int g16, int num_blocks, int split, cudaStream_t stream) {
  if constexpr (BM <= 16) {
    if (bk == 256) {
      switch (g16) {
        case 0: return launch<T, BM, 256, 0, HAS_ZEROS, false>(p, num_blocks, split, stream);
        case 2: return launch<T, BM, 256, 2, HAS_ZEROS, false>(p, num_blocks, split, stream);
        case 4: return launch<T, BM, 256, 4, HAS_ZEROS, false>(p, num_blocks, split, stream);
        case 8: return launch<T, BM, 256, 8, HAS_ZEROS, false>(p, num_blocks, split, stream);
        default: return cudaErrorInvalidValue;
      }
    }
  }
  constexpr bool kFold = W4_INT4_FOLD != 0 && BM >= 32;
  if (bk == 128) {
    switch (g16) {
      case 0: return launch<T, BM, 128, 0, HAS_ZEROS, false, kFold>(p, num_blocks, split, stream);
      case 2: return launch<T, BM, 128, 2, HAS_ZEROS, false, kFold>(p, num_blocks, split, stream);
      case 4: return launch<T, BM, 128, 4, HAS_ZEROS, false, kFold>(p, num_blocks, split, stream);
      default: return cudaErrorInvalidValue;
    }
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t by_shape(const Args& p, int bm, int bk, int g16, int num_blocks, int split, cudaStream_t stream) {
  const bool z = p.zeros != nullptr;
  if (bm == 8) return z ? by_group<T, 8, true>(p, bk, g16, num_blocks, split, stream)
                        : by_group<T, 8, false>(p, bk, g16, num_blocks, split, stream);
  if (bm == 16) return z ? by_group<T, 16, true>(p, bk, g16, num_blocks, split, stream)
                         : by_group<T, 16, false>(p, bk, g16, num_blocks, split, stream);
  if (bk != 128) return cudaErrorInvalidValue;  // wider blocks: 128-wide stages only (shared memory)
  if (bm == 32) return z ? by_group<T, 32, true>(p, bk, g16, num_blocks, split, stream)
                         : by_group<T, 32, false>(p, bk, g16, num_blocks, split, stream);
  if (bm == 64) return z ? by_group<T, 64, true>(p, bk, g16, num_blocks, split, stream)
                         : by_group<T, 64, false>(p, bk, g16, num_blocks, split, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

extern "C" {

const char* vllm_capi_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

// The CTA's output channels, for the Python side's grid.
int vllm_int4_mma_block_n() { return kRows; }

// Returns a cudaError_t (0 = launched).  dtype: 0 bf16, 1 fp16.  bm: 8, 16, 32 or 64 rows per block.
// bk: the stage width, 128 or 256 (32 and 64 rows: 128).  Requirements (checked by the caller): N % 16 == 0, K % bk == 0, group a
// multiple of 32 that divides bk or is a multiple of it, split <= K / bk, rows of every tensor
// 16-byte aligned.  pdl: launch with programmatic dependent launch (sm_90+).
int vllm_int4_mma_moe_gemm(int dtype, const void* a, long long stride_am, const void* qw, long long stride_qe,
                           const void* scales, long long stride_se, long long stride_sg, const void* zeros,
                           long long stride_ze, long long stride_zg, void* out, long long stride_os,
                           long long stride_om, int out_fp32, const float* topk_weights,
                           const int32_t* sorted_ids, const int32_t* block_expert,
                           const int32_t* num_post_padded, int num_blocks, int bm, int num_pairs,
                           int top_k_in, int N, int K, int group, int bk, int split, int pdl, void* stream) {
  Args p = {};
  p.a = a;
  p.stride_am = stride_am;
  p.qw = reinterpret_cast<const uint4*>(qw);
  p.stride_qe = stride_qe;
  p.scales = scales;
  p.stride_se = stride_se;
  p.stride_sg = stride_sg;
  p.zeros = reinterpret_cast<const uint8_t*>(zeros);
  p.stride_ze = stride_ze;
  p.stride_zg = stride_zg;
  p.bias = nullptr;
  set_output_and_routing(p, out, stride_os, stride_om, out_fp32, topk_weights, sorted_ids, block_expert,
                         num_post_padded, num_pairs, top_k_in);
  set_launch_fields(p, N, K, group, bk, split);
  const int g16 = group < bk ? group / 16 : 0;
  p.pdl = pdl;
  p.magic = dtype == 0 ? Act<__nv_bfloat16>::kMagic : Act<__half>::kMagic;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == 0) return by_shape<__nv_bfloat16>(p, bm, bk, g16, num_blocks, split, s);
  if (dtype == 1) return by_shape<__half>(p, bm, bk, g16, num_blocks, split, s);
  return cudaErrorInvalidValue;
}

}  // extern "C"
