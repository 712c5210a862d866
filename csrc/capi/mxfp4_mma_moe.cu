// The MXFP4 (e2m1 values, e8m0 scales per 32 inputs, optional bias) entry of the tensor-core 4-bit MoE GEMM
// (kernel: w4_mma_moe.cuh).  bf16 activations only: the decode places the e2m1 bits into bf16.
#include "w4_mma_launch.cuh"

namespace {

template <int BM, bool FOLD>
cudaError_t mx_by_stage(const Args& p, int bk, int num_blocks, int split, cudaStream_t stream) {
  using T = __nv_bfloat16;
  if (bk == 64) return launch<T, BM, 64, 2, false, true, FOLD>(p, num_blocks, split, stream);
  if (bk == 128) return launch<T, BM, 128, 2, false, true, FOLD>(p, num_blocks, split, stream);
  if constexpr (BM <= 16) {
    if (bk == 256) return launch<T, BM, 256, 2, false, true, FOLD>(p, num_blocks, split, stream);
  }
  return cudaErrorInvalidValue;
}

template <int BM>
cudaError_t mx_by_fold(const Args& p, int fold, int bk, int num_blocks, int split, cudaStream_t stream) {
  return fold ? mx_by_stage<BM, true>(p, bk, num_blocks, split, stream)
              : mx_by_stage<BM, false>(p, bk, num_blocks, split, stream);
}

}  // namespace

extern "C" {

// Returns a cudaError_t (0 = launched).  a: bf16 [rows, K]; words: [E, N/16, K/64, 32, 4] int32
// (ops/mxfp4_mma_layout.py); scales: uint8 e8m0 [E, K/32, N]; bias: bf16 [E, N] or null.  bm: 8, 16, 32
// or 64 rows per block; bk: the stage width, 64, 128 or 256 (32 and 64 rows: 64 or 128).  Requirements
// (checked by the caller): N % 16 == 0, K % 64 == 0 (the last stage may be partial), split <= the stages, rows
// of every tensor 16-byte aligned.  fold: every exponent is <= 128, so the scales may join the decode (exact).
int vllm_mxfp4_mma_moe_gemm(const void* a, long long stride_am, const void* qw, long long stride_qe,
                            const void* scales, long long stride_se, long long stride_sg, const void* bias,
                            long long stride_be, void* out, long long stride_os, long long stride_om, int out_fp32,
                            const float* topk_weights, const int32_t* sorted_ids, const int32_t* block_expert,
                            const int32_t* num_post_padded, int num_blocks, int bm, int num_pairs, int top_k_in,
                            int N, int K, int bk, int split, int fold, int pdl, void* stream) {
  Args p = {};
  p.a = a;
  p.stride_am = stride_am;
  p.qw = reinterpret_cast<const uint4*>(qw);
  p.stride_qe = stride_qe;
  p.scales = scales;
  p.stride_se = stride_se;
  p.stride_sg = stride_sg;
  p.zeros = nullptr;
  p.bias = bias;
  p.stride_be = stride_be;
  set_output_and_routing(p, out, stride_os, stride_om, out_fp32, topk_weights, sorted_ids, block_expert,
                         num_post_padded, num_pairs, top_k_in);
  set_launch_fields(p, N, K, 32, bk, split);
  p.pdl = pdl;
  p.magic = kMxMul;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (bm) {
    case 8: return mx_by_fold<8>(p, fold, bk, num_blocks, split, s);
    case 16: return mx_by_fold<16>(p, fold, bk, num_blocks, split, s);
    case 32: return mx_by_fold<32>(p, fold, bk, num_blocks, split, s);
    case 64: return mx_by_fold<64>(p, fold, bk, num_blocks, split, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // extern "C"
