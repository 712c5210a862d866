// The host side of the tensor-core 4-bit MoE GEMM (kernel: w4_mma_moe.cuh): one template instance's launch
// (its shared memory set once, the grid, programmatic dependent launch) and the Args fields both C entries
// (int4_mma_moe.cu, mxfp4_mma_moe.cu) fill the same way.
#pragma once
#include "w4_mma_moe.cuh"

namespace {

template <typename T, int BM, int BK, int G16, bool HAS_ZEROS, bool MX, bool FOLD = false>
cudaError_t launch(const Args& p, int num_blocks, int split, cudaStream_t stream) {
  using L = Layout<T, BM, BK, G16, HAS_ZEROS, MX>;
  auto kernel = w4_mma_moe_kernel<T, BM, BK, G16, HAS_ZEROS, MX, FOLD>;
  static bool configured = false;  // the attribute is set once, outside any graph capture
  if (!configured) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kSmem);
    if (e != cudaSuccess) return e;
    configured = true;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(num_blocks * p.n_tiles, split);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = L::kSmem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  if (p.pdl) {
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attr;
    config.numAttrs = 1;
  }
  cudaError_t e = cudaLaunchKernelEx(&config, kernel, p);
  return e != cudaSuccess ? e : cudaGetLastError();
}

// The shared part of both C entries: where the rows go, and which pairs the blocks hold.
inline void set_output_and_routing(Args& p, void* out, long long stride_os, long long stride_om, int out_fp32,
                                   const float* topk_weights, const int32_t* sorted_ids,
                                   const int32_t* block_expert, const int32_t* num_post_padded, int num_pairs,
                                   int top_k_in) {
  p.out = out;
  p.stride_os = stride_os;
  p.stride_om = stride_om;
  p.out_fp32 = out_fp32;
  p.topk_weights = topk_weights;
  p.sorted_ids = sorted_ids;
  p.block_expert = block_expert;
  p.num_post_padded = num_post_padded;
  p.num_pairs = num_pairs;
  p.top_k_in = top_k_in;
}

// ... and the grid, the split's stage count, the group's shape.
inline void set_launch_fields(Args& p, int N, int K, int group, int bk, int split) {
  p.N = N;
  p.K = K;
  p.group = group;
  p.n_tiles = (N + kRows - 1) / kRows;
  const int k_stages = (K + bk - 1) / bk;  // int4: K % bk == 0; MXFP4: a partial last stage
  p.stages_per_split = (k_stages + split - 1) / split;
  p.group_stages = group < bk ? 1 : group / bk;
}

}  // namespace
