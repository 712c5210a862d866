// The tensor-core 4-bit MoE GEMM's (w4_mma_moe.cuh) compile-time shape and switches, the launch arguments both
// entries fill (Args) and the shared-memory layout of one pipeline stage (Layout).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

#ifndef W4_WARPS  // warps per CTA (16 output channels each): 8, or 4 - CTAs of half the rows, so that with a K split
#define W4_WARPS 8  // a one-token launch (Qwen3-30B-A3B w13: 96 CTAs of 8 warps) spreads over every SM (a variant to time)
#endif
constexpr int kWarps = W4_WARPS;
static_assert(kWarps == 4 || kWarps == 8, "W4_WARPS: 4 or 8 (whole warpgroups)");
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16 * kWarps;  // output channels per CTA
#ifndef INT4_MMA_STAGES  // pipeline depth; VLLM_CSRC_FLAGS="-DINT4_MMA_STAGES=n" builds a variant to time
#define INT4_MMA_STAGES 4
#endif
constexpr int kStages = INT4_MMA_STAGES;  // 64-wide stages of narrow blocks: twice as many (bytes in flight)
#ifndef INT4_MMA_LDSM  // B fragments by ldmatrix (1: one x2 / x4 per one / two n8 tiles) or by 32-bit loads (0)
#define INT4_MMA_LDSM 1
#endif
constexpr int kAPad = 8;  // activation row padding (elements): conflict-free B fragment loads
// W4_SKIP_PAD: sorted blocks skip the MMAs (and their B reads) of the n8 token tiles after the block's last real
// row (an expert's padding). 1 (default): int4 blocks of 64 rows only; 2: every int4 / MXFP4 block of 32 / 64 rows;
// 0: none. H200, nineteenth session: 64-row int4 blocks gain (Mixtral 256 tokens, w13 664.8 -> 586.4 us), 32-row
// blocks lose 7-12 % (Qwen3 256, Mixtral 64) and 64-row MXFP4 blocks 1-2 % (gpt-oss-20b 256).
#ifndef W4_SKIP_PAD
#define W4_SKIP_PAD 1
#endif
template <int NT, bool MX>
constexpr bool kSkipPad = W4_SKIP_PAD == 2 ? NT >= 4 : W4_SKIP_PAD == 1 && !MX && NT == 8;

struct Args {
  const void* a;  // [rows, K] activations, unit column stride
  long long stride_am;
  const uint4* qw;  // repacked words, [E, N/16, K/64, 32, 4] int32
  long long stride_qe;  // in int32 words
  const void* scales;  // [E, Gs, N], activation dtype (MXFP4: uint8 e8m0)
  long long stride_se, stride_sg;
  const uint8_t* zeros;  // [E, Gs, N] or null (symmetric: 8)
  long long stride_ze, stride_zg;
  const void* bias;  // [E, N] activation dtype, or null
  long long stride_be;
  void* out;  // [pairs, N] activation dtype, or fp32 [split, pairs, N] partials
  long long stride_os, stride_om;
  const float* topk_weights;  // [pairs] or null
  const int32_t* sorted_ids;  // [blocks * BM] pair ids (sentinel = num_pairs), or null: block b = pair b
  const int32_t* block_expert;  // [blocks] local expert, -1 = skip
  const int32_t* num_post_padded;  // [1] or null
  int num_pairs, top_k_in, N, K, group, n_tiles, stages_per_split, out_fp32;
  int group_stages;  // group / 128 when the group spans whole stages (G16 == 0), else 1
  uint32_t magic;  // Act<T>::kMagic (MXFP4: kMxMul), passed at run time so that it stays in a register
  int pdl;  // launched with programmatic dependent launch: wait for the previous kernel first
};

template <typename T, int BM, int BK, int G16, bool HAS_ZEROS, bool MX>
struct Layout {
  static constexpr int kScaleBytes = MX ? 1 : 2;
  static constexpr int kBK = BK;
  static constexpr int kGroupsPerStage = G16 == 0 ? 1 : kBK / (16 * G16);
  static constexpr int kWBytes = kWarps * (kBK / 64) * 512;
  static constexpr int kABytes = BM * (kBK + kAPad) * 2;
  static constexpr int kSBytes = kGroupsPerStage * kRows * kScaleBytes;
  static constexpr int kZBytes = HAS_ZEROS ? kGroupsPerStage * kRows : 0;
  static constexpr int kStageBytes = kWBytes + kABytes + kSBytes + kZBytes;
  static constexpr int kSt = BK == 64 && BM <= 16 ? 2 * kStages : kStages;
  static constexpr int kSmem = kSt * kStageBytes + 2 * BM * 4;  // + the block's pair ids and rows
};

}  // namespace
