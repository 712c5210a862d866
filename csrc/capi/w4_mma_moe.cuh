// 4-bit-weight grouped MoE GEMM on tensor cores for few rows per expert (decode): out^T = W @ a^T.
// Shared by the int4 (W4A16, csrc/capi/int4_mma_moe.cu) and MXFP4 (csrc/capi/mxfp4_mma_moe.cu) entries.
//
// The 4-bit weight is the mma.sync A operand (16 output channels x 16 inputs), the block's tokens the
// B operand (16 inputs x 8 tokens), so one m16n8k16 serves up to 8 tokens of one expert and 16 rows
// take two.  On sm_90a, blocks of 32 rows (and of 64 with folded MXFP4 scales) issue Hopper's warpgroup MMA
// instead (w4_wgmma.cuh): the same A fragments, the tokens one shared-memory B operand per four warps.
// The weights are repacked once at load (vllm/.../ops/int4_mma_layout.py) so that each
// lane's A fragment of one 16 x 16 tile is ONE int32 word, word[e, nt, kc, lane, j] (nt = N/16 row
// tile, kc = K/64 chunk, j = k16 tile 0..3 of the chunk; g = lane / 4, t = lane % 4): register r of
// the fragment holds rows g (r even) / g + 8 (r odd), columns 2t, 2t+1 (r < 2) / 2t+8, 2t+9 (r >= 2).
//
// int4: nibble r of the word is register r's first element, nibble r + 4 its second, so
// (word >> 4r) & 0x000F000F places them in the two halves of a 16-bit pair, and OR-ing the exponent
// of 2^7 (bf16) or 2^10 (fp16) makes them the floats bias + q exactly (one LOP3 each).  Subtracting
// bias + zero (exact: a small integer) gives register r, q - z.
// MXFP4 (bf16 only): an e2m1 code's sign / exponent / mantissa bits go to bf16 bits 15 / 8-7 / 6,
// which makes the bf16 value * 2^-126 exactly (exponent 0: a bf16 subnormal), and one HMUL2 by 2^126
// restores it.  No rotation of one bit pattern tiles a word four times, so the word holds two
// registers whose bits a rotation + LOP3 places, and two whose magnitude and sign bits come from two
// rotations (ops/mxfp4_mma_layout.py writes that table; decode_mx below reads it).
// The MMA sums w * a exactly in fp32; each scale group's partial sum is then scaled in fp32 (4 FMAs
// per thread and group; the e8m0 scale 2^(s-127) for MXFP4), so the result is the fp32 reference's up
// to summation order, rounded once (+ bias, x router weight).
//
// One CTA: one sorted block (<= BM tokens of one expert), 16 * WARPS output channels (a warp owns
// one 16-row tile), a K range of whole 64 / 128 / 256-wide stages (split-K over blockIdx.y: fp32
// partials that the caller's reduction adds; the bias joins split 0's).  Every stage - the packed
// words, the block's activation rows, the stage's scale (and zero) rows - is copied into shared
// memory by cp.async, STAGES deep.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "w4_mma_args.cuh"
#include "w4_mma_ptx.cuh"
#include "w4_wgmma.cuh"

namespace {

// BK: inputs per stage (64 (MXFP4), 128 or 256).  G16: group size in 16-input tiles when it divides the stage
// (2, 4, 8), or 0: the group is a multiple of the stage (its scale row changes only at stage starts).
// MX: MXFP4 words and e8m0 scales (group 32, G16 = 2, no zeros).  FOLD (MXFP4 whose exponents are all <= 128):
// the group's scale joins the decode's HMUL2 (2^(s - 1) in bf16: the weight v * 2^(s - 127) exactly) and the MMAs
// accumulate the whole K range, no per-group fp32 scaling; otherwise each group's fp32 sum is scaled.  FOLD on int4
// (the int4 entry's W4_INT4_FOLD variant): one HMUL2 per register by the group's scale after the zero's HSUB2.
template <typename T, int BM, int BK, int G16, bool HAS_ZEROS, bool MX, bool FOLD>
__global__ void __launch_bounds__(kThreads) w4_mma_moe_kernel(Args p) {
  using L = Layout<T, BM, BK, G16, HAS_ZEROS, MX>;
  constexpr int kSb = L::kScaleBytes;
  constexpr int kBK = BK;
  constexpr int NT = BM / 8;  // n8 tiles
  // warpgroup MMAs (w4_wgmma.cuh) instead of mma.sync: 32-row blocks, and 64-row ones without per-group fp32 sums
  // (H200: int4 64-row blocks lost 23 %, seventeenth session)
  constexpr bool WG = kWgmmaBuilt && (BM == 32 || (BM == 64 && FOLD));
  extern __shared__ __align__(16) uint8_t smem[];
  int32_t* s_pair = reinterpret_cast<int32_t*>(smem + L::kSt * L::kStageBytes);
  int32_t* s_row = s_pair + BM;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (p.pdl) {  // the previous kernel's writes (activations, routing) are visible after this; then let the
                // next kernel launch (it waits for this one in turn), as vllm/.../ops/_pdl.py's pdl_wait
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  }
#endif
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int block = blockIdx.x / p.n_tiles, n_tile = blockIdx.x % p.n_tiles;
  const int n0 = n_tile * kRows;
  const int split = blockIdx.y;
  const bool sorted = p.sorted_ids != nullptr;
  if (sorted && p.num_post_padded != nullptr && block * BM >= p.num_post_padded[0]) return;
  const int expert = p.block_expert[block];
  if (expert < 0) return;  // uniform over the CTA

  if (tid < BM) {
    int pair = -1;
    if (sorted) {
      int id = p.sorted_ids[block * BM + tid];
      pair = (id >= 0 && id < p.num_pairs) ? id : -1;
    } else if (tid == 0) {
      pair = block;
    }
    s_pair[tid] = pair;
    s_row[tid] = pair >= 0 ? pair / p.top_k_in : -1;
  }
  __syncthreads();
  // W4_SKIP_PAD: the n8 token tiles up to the block's last real row (block-uniform); the MMAs of the tiles after
  // it, which hold only padding (an expert's rows end in its last block), are not issued
  int nt_live = NT;
  if constexpr (kSkipPad<NT, MX>) {
    int last = -1;
#pragma unroll
    for (int r = lane; r < BM; r += 32) last = s_pair[r] >= 0 ? r : last;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(0xFFFFFFFFu, last, o));
    nt_live = last < 0 ? 1 : last / 8 + 1;
  }

  const int k_stages = (p.K + kBK - 1) / kBK;  // MXFP4: the last stage may be partial (K % 64 == 0)
  const int st_first = split * p.stages_per_split;
  const int st_last = min(st_first + p.stages_per_split, k_stages);
  const int n_iters = max(st_last - st_first, 0);
  const int k_chunks = p.K / 64;
  const uint4* qw_e = p.qw + expert * (p.stride_qe / 4);
  const T* a_base = reinterpret_cast<const T*>(p.a);
  const uint8_t* s_base = reinterpret_cast<const uint8_t*>(p.scales) + expert * p.stride_se * kSb;
  const uint8_t* z_base = HAS_ZEROS ? p.zeros + expert * p.stride_ze : nullptr;
  const int rows_here = min(kRows, p.N - n0);  // a multiple of 16

  // Each thread's share of a stage's copies, set up once: per stage only an offset is added.
  constexpr int kWPieces = kWarps * (kBK / 64) * 32;  // 16-byte pieces of packed words
  constexpr int kWPer = kWPieces / kThreads;
  constexpr int kAPieces = BM * (kBK / 8);
  constexpr int kAPer = (kAPieces + kThreads - 1) / kThreads;
  constexpr int kSPieces = L::kGroupsPerStage * (kRows * kSb / 16);
  constexpr int kZPieces = HAS_ZEROS ? L::kGroupsPerStage * (kRows / 16) : 0;
  static_assert(kWPieces % kThreads == 0 && kSPieces + kZPieces <= kThreads,
                "copy plan");
  const uint4* w_src[kWPer];
  bool w_ok[kWPer];
  int w_k[kWPer];  // the piece's first input within the stage (a partial last stage copies whole 64-input chunks)
#pragma unroll
  for (int i = 0; i < kWPer; ++i) {
    const int piece = tid + i * kThreads;
    const int rt = piece / ((kBK / 64) * 32), rem = piece % ((kBK / 64) * 32);
    w_k[i] = (rem / 32) * 64;
    w_ok[i] = rt * 16 < rows_here;
    w_src[i] = w_ok[i] ? qw_e + (long long)(n0 / 16 + rt) * k_chunks * 32 + rem : qw_e;
  }
  // activation piece -> (row of the block, 8-input chunk), and the chunk's byte offset in the stage's activation
  // area: token-major rows (mma.sync) or wgmma's core matrices (chunk-major; two chunks of a row per thread pair,
  // one 32-byte sector read)
  auto a_row = [](int piece) { return WG ? (piece >> 1) % BM : piece / (kBK / 8); };
  auto a_chunk = [](int piece) { return WG ? 2 * ((piece >> 1) / BM) + (piece & 1) : piece % (kBK / 8); };
  auto a_off = [](int r, int c) { return WG ? (c * BM + r) * 16 : (r * (kBK + kAPad) + c * 8) * 2; };
  // activation pieces: kept per thread for narrow blocks; wide ones (32, 64 rows) recompute them per stage
  // from the row table in shared memory (registers)
  constexpr bool kCacheA = kAPer <= 2;
  const T* a_src[kCacheA ? kAPer : 1];
  bool a_ok[kCacheA ? kAPer : 1];
  if constexpr (kCacheA) {
#pragma unroll
    for (int i = 0; i < kAPer; ++i) {
      const int piece = tid + i * kThreads;
      const int row = piece < kAPieces ? s_row[a_row(piece)] : -1;
      a_ok[i] = row >= 0;
      a_src[i] = a_base + (long long)(row < 0 ? 0 : row) * p.stride_am + a_chunk(piece) * 8;
    }
  }
  // scales on threads [0, kSPieces), zeros on [kSPieces, kSPieces + kZPieces)
  const bool s_has = tid < kSPieces;
  const bool z_has = HAS_ZEROS && tid >= kSPieces && tid < kSPieces + kZPieces;
  const uint8_t* s_src = s_base;
  const uint8_t* z_src = z_base;
  int sz_dst = 0, s_k = 0;  // s_k: the scale row's first input within the stage
  bool sz_ok = false;
  if (s_has) {
    const int gi = tid / (kRows * kSb / 16), c = tid % (kRows * kSb / 16);
    s_k = G16 == 0 ? 0 : gi * 16 * G16;
    sz_ok = c * (16 / kSb) < rows_here;
    s_src = s_base + ((long long)gi * p.stride_sg + n0 + (sz_ok ? c * (16 / kSb) : 0)) * kSb;
    sz_dst = L::kWBytes + L::kABytes + tid * 16;
  } else if (z_has) {
    const int zp = tid - kSPieces, gi = zp / (kRows / 16), c = zp % (kRows / 16);
    sz_ok = c * 16 < rows_here;
    z_src = z_base + (long long)gi * p.stride_zg + n0 + (sz_ok ? c * 16 : 0);
    sz_dst = L::kWBytes + L::kABytes + L::kSBytes + zp * 16;
  }

  // the scale / zero row of the first group of the next stage to load, kept as a running count (no
  // division per stage): stages are loaded in order
  int ld_grp = G16 == 0 ? st_first / p.group_stages : st_first * L::kGroupsPerStage;
  int ld_sig = G16 == 0 ? st_first % p.group_stages : 0;
  auto load_stage = [&](int slot, int st) {
    uint8_t* base = smem + slot * L::kStageBytes;
    // inputs of this stage inside K: kBK except in an MXFP4 partial last stage, whose missing chunks, columns
    // and scale rows are zero-filled (zero weights and activations add nothing)
    const int k_left = MX ? p.K - st * kBK : kBK;
#pragma unroll
    for (int i = 0; i < kWPer; ++i) {
      const bool ok = w_ok[i] && (!MX || w_k[i] < k_left);
      cp_async16(base + (tid + i * kThreads) * 16, w_src[i] + (ok ? st * (kBK / 64) * 32 : 0), ok);
    }
#pragma unroll
    for (int i = 0; i < kAPer; ++i) {
      const int piece = tid + i * kThreads;
      if (piece >= kAPieces) continue;
      const int r = a_row(piece), c = a_chunk(piece);
      uint8_t* dst = base + L::kWBytes + a_off(r, c);
      const bool in_k = !MX || c * 8 < k_left;
      if constexpr (kCacheA) {
        cp_async16(dst, a_src[i] + (in_k ? st * kBK : 0), a_ok[i] && in_k);
      } else {
        const int row = s_row[r];
        const bool ok = row >= 0 && in_k;
        cp_async16(dst, a_base + (ok ? (long long)row * p.stride_am + st * kBK + c * 8 : 0), ok);
      }
    }
    if (s_has || z_has) {
      const long long grp = ld_grp;
      const bool s_ok = sz_ok && (!MX || s_k < k_left);
      if (s_has) cp_async16(base + sz_dst, s_src + (s_ok ? grp * p.stride_sg * kSb : 0), s_ok);
      else cp_async16(base + sz_dst, z_src + (sz_ok ? grp * p.stride_zg : 0), sz_ok);
    }
    if (G16 == 0) {
      if (++ld_sig == p.group_stages) ld_sig = 0, ++ld_grp;
    } else {
      ld_grp += L::kGroupsPerStage;
    }
  };

  // part: the current group's sums; with one or two n8 tiles two chains (even / odd 16-input tiles) so
  // that consecutive MMAs do not wait for each other (wider blocks have independent tiles already)
  constexpr int kChains = NT >= 4 ? 1 : 2;
  float acc[NT][4], part[2][NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = part[0][n][i] = part[1][n][i] = 0.f;
  float s_lo = FOLD ? 1.f : 0.f, s_hi = FOLD ? 1.f : 0.f;  // scales of rows g and g + 8 in the current group
  uint32_t mul_lo = p.magic, mul_hi = p.magic;  // FOLD: the decode's multipliers of rows g and g + 8
  uint32_t zz_lo = 0, zz_hi = 0;  // bias + zero of rows g and g + 8, as x2 pairs
  const bool warp_active = warp * 16 < rows_here;
  int stage_in_group = G16 == 0 ? st_first % p.group_stages : 0;  // compute side's running count

#pragma unroll
  for (int s = 0; s < L::kSt - 1; ++s) {
    if (s < n_iters) load_stage(s, st_first + s);
    cp_async_commit();
  }

  // the main loop over the first LV n8 token tiles: NT, or with W4_SKIP_PAD a half / quarter of them when the
  // rest of the block is padding (one branch per block, so each variant's loop is compiled on its own)
  auto main_loop = [&](auto lv) {
    constexpr int LV = decltype(lv)::value;
    static_assert(LV >= 1 && LV <= NT, "live n8 token tiles");
    for (int it = 0; it < n_iters; ++it) {
      cp_async_wait<L::kSt - 2>();
      __syncthreads();
      {
        const int nxt = it + L::kSt - 1;
        if (nxt < n_iters) load_stage(nxt % L::kSt, st_first + nxt);
        cp_async_commit();
      }
      const int slot = it % L::kSt;
      const uint8_t* base = smem + slot * L::kStageBytes;
      const uint4* w_sm = reinterpret_cast<const uint4*>(base) + warp * (kBK / 64) * 32;
      const T* a_sm = reinterpret_cast<const T*>(base + L::kWBytes);
      const uint8_t* s_sm = base + L::kWBytes + L::kABytes;
      const uint8_t* z_sm = base + L::kWBytes + L::kABytes + L::kSBytes;
      const bool group_starts = it == 0 || stage_in_group == 0;
      if (G16 == 0 && ++stage_in_group == p.group_stages) stage_in_group = 0;
      if (!WG && !warp_active) continue;  // (a warpgroup's MMAs take all four warps)
      uint32_t afs[WG ? kBK / 16 : 1][4];  // wgmma: the stage's A fragments stay until its MMAs complete

      auto new_group = [&](int gi) {
        if constexpr (WG && !FOLD) {  // the group's MMAs complete before its sums are scaled
          wgmma_commit();
          wgmma_wait_all();
          wgmma_settle(part[0]);
        }
        const int r = warp * 16 + g;
        if constexpr (FOLD && MX) {  // bf16 2^(s - 1) in both halves: exponent field s + 126
          mul_lo = static_cast<uint32_t>(s_sm[gi * kRows + r]) * 0x00800080u + 0x3F003F00u;
          mul_hi = static_cast<uint32_t>(s_sm[gi * kRows + r + 8]) * 0x00800080u + 0x3F003F00u;
          return;
        }
        if constexpr (!FOLD) {
#pragma unroll
          for (int n = 0; n < LV; ++n) {  // (the tiles after LV hold zeros)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              acc[n][i] += (i < 2 ? s_lo : s_hi) * (kChains == 2 ? part[0][n][i] + part[1][n][i] : part[0][n][i]);
              part[0][n][i] = part[1][n][i] = 0.f;
            }
          }
        }
        if constexpr (MX) {
          s_lo = e8m0_to_float(s_sm[gi * kRows + r]);
          s_hi = e8m0_to_float(s_sm[gi * kRows + r + 8]);
          return;  // no zeros
        }
        const T* sc = reinterpret_cast<const T*>(s_sm) + gi * kRows + r;
        if constexpr (FOLD) {  // int4: the decode multiplies by the scale, (q - z) * s rounded once to T
          mul_lo = Act<T>::pair(Act<T>::to_float(sc[0]));
          mul_hi = Act<T>::pair(Act<T>::to_float(sc[8]));
        } else {
          s_lo = Act<T>::to_float(sc[0]);
          s_hi = Act<T>::to_float(sc[8]);
        }
        const float z_lo = HAS_ZEROS ? float(z_sm[gi * kRows + r]) : 8.f;
        const float z_hi = HAS_ZEROS ? float(z_sm[gi * kRows + r + 8]) : 8.f;
        zz_lo = Act<T>::pair(Act<T>::kBias + z_lo);
        zz_hi = Act<T>::pair(Act<T>::kBias + z_hi);
      };
      if (G16 == 0 && group_starts) new_group(0);

#pragma unroll
      for (int kc = 0; kc < kBK / 64; ++kc) {
        const uint4 wq = w_sm[kc * 32 + lane];
        const uint32_t words[4] = {wq.x, wq.y, wq.z, wq.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int kt = kc * 4 + j;  // 16-input tile within the stage
          if (G16 != 0 && kt % (G16 == 0 ? 1 : G16) == 0) new_group(kt / (G16 == 0 ? 1 : G16));
          const uint32_t w = words[j];
          uint32_t(&af)[4] = afs[WG ? kt : 0];
          if constexpr (MX) {
            decode_mx(w, mul_lo, mul_hi, af);
          } else {
            af[0] = Act<T>::sub(lop_nibbles(w, p.magic), zz_lo);
            af[1] = Act<T>::sub(lop_nibbles(w >> 4, p.magic), zz_hi);
            af[2] = Act<T>::sub(lop_nibbles(w >> 8, p.magic), zz_lo);
            af[3] = Act<T>::sub(lop_nibbles(w >> 12, p.magic), zz_hi);
            if constexpr (FOLD) {
#pragma unroll
              for (int i = 0; i < 4; ++i) af[i] = Act<T>::mul(af[i], i % 2 ? mul_hi : mul_lo);
            }
          }
          if constexpr (WG) {
            // chunks 2kt, 2kt + 1: core matrices BM * 16 bytes apart in K, 128 bytes (8 tokens) apart in N
            wgmma_fence();
            // (LV < NT: the first LV n8 tiles of tokens, whose accumulators lead part[0])
            Wgmma<T, LV>::run(part[0], af, wgmma_desc(a_sm + kt * 2 * BM * 8, BM * 16, 128));
          } else if constexpr (INT4_MMA_LDSM) {
            // lane l addresses row l % 8 of matrix l / 8: (tile 2p + m / 2, inputs + 8 (m % 2))
            const T* lrow = a_sm + (((lane >> 4) & (NT > 1 ? 1 : 0)) * 8 + (lane & 7)) * (kBK + kAPad) + kt * 16 +
                            ((lane >> 3) & 1) * 8;
            if constexpr (NT == 1) {
              uint32_t b0, b1;
              ldsm_x2(b0, b1, lrow);
              Act<T>::mma(part[j & (kChains - 1)][0], af, b0, b1);
            } else {
#pragma unroll
              for (int n = 0; n < LV; n += 2) {
                uint32_t b0, b1, c0, c1;
                ldsm_x4(b0, b1, c0, c1, lrow + n * 8 * (kBK + kAPad));
                Act<T>::mma(part[j & (kChains - 1)][n], af, b0, b1);
                Act<T>::mma(part[j & (kChains - 1)][n + 1], af, c0, c1);
              }
            }
          } else {
#pragma unroll
            for (int n = 0; n < LV; ++n) {
              const T* arow = a_sm + (n * 8 + g) * (kBK + kAPad) + kt * 16 + 2 * t;
              const uint32_t b0 = *reinterpret_cast<const uint32_t*>(arow);
              const uint32_t b1 = *reinterpret_cast<const uint32_t*>(arow + 8);
              Act<T>::mma(part[j & (kChains - 1)][n], af, b0, b1);
            }
          }
        }
      }
      if constexpr (WG) {  // the stage's MMAs complete before its slot is refilled
        wgmma_commit();
        wgmma_wait_all();
        wgmma_settle(part[0]);
#pragma unroll
        for (int kt = 0; kt < kBK / 16; ++kt) wgmma_keep(afs[kt]);
      }
    }
  };
  if constexpr (kSkipPad<NT, MX>) {
    if (NT >= 8 && nt_live <= NT / 4) {
      main_loop(std::integral_constant<int, (NT >= 8 ? NT / 4 : NT)>{});
    } else if (nt_live <= NT / 2) {
      main_loop(std::integral_constant<int, NT / 2>{});
    } else {
      main_loop(std::integral_constant<int, NT>{});
    }
  } else {
    main_loop(std::integral_constant<int, NT>{});
  }
  cp_async_wait<0>();
  if (!warp_active) return;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      acc[n][i] += (i < 2 ? s_lo : s_hi) * (kChains == 2 ? part[0][n][i] + part[1][n][i] : part[0][n][i]);

  const int col_lo = n0 + warp * 16 + g;
  const T* bias = p.bias != nullptr && split == 0 ? reinterpret_cast<const T*>(p.bias) + expert * p.stride_be : nullptr;
  const float b_lo = bias != nullptr ? Act<T>::to_float(bias[col_lo]) : 0.f;
  const float b_hi = bias != nullptr ? Act<T>::to_float(bias[col_lo + 8]) : 0.f;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int tok = n * 8 + 2 * t + (i & 1);
      const int pair = s_pair[tok];
      if (pair < 0) continue;
      const int col = col_lo + (i >= 2 ? 8 : 0);
      float v = acc[n][i] + (i >= 2 ? b_hi : b_lo);
      if (p.topk_weights != nullptr) v *= p.topk_weights[pair];
      if (p.out_fp32) {
        float* o = reinterpret_cast<float*>(p.out);
        o[split * p.stride_os + (long long)pair * p.stride_om + col] = v;
      } else {
        T* o = reinterpret_cast<T*>(p.out);
        o[(long long)pair * p.stride_om + col] = Act<T>::from_float(v);
      }
    }
  }
}

}  // namespace
