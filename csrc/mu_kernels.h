// C ABI of the moe-unlearn CUDA kernels. No torch headers: the .cu files compile with plain nvcc
// (CI compile-checks them for sm_90 on a CPU machine); binding.cpp adapts torch tensors to this ABI.
// Every function returns a cudaError_t value (0 = success) and launches on the given stream.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { MU_F32 = 0, MU_F16 = 1, MU_BF16 = 2 };

// Largest number of experts the warp-per-token routing kernel holds in registers (8 per lane).
#define MU_ROUTING_MAX_EXPERTS 256

// Pass 1 of routing_stats. One warp walks `warp_chunk` consecutive tokens in sequence-id order
// (position p reads row perm[p], or p when perm is NULL; seq_sorted[p] is that token's sequence).
// Writes, per warp w: part_score / part_count [n_warps, E] (its score sums and selection counts) and,
// for every sequence s it meets, the exclusive slot w + s of slot_gate [n_warps + S, E] / slot_tok.
// topk_in [T, K] (row-major, may be NULL: then the kernel picks the top-K of the logits, ties to the
// lower index) ; topk_out [T, K] may be NULL.
int mu_routing_stats_pass(const void* logits, int dtype, int64_t T, int E, int64_t stride_t, int64_t stride_e,
                          const int32_t* perm, const int32_t* seq_sorted, const uint8_t* mask,
                          const int64_t* topk_in, int64_t* topk_out, int K, int sigmoid,
                          float* slot_gate, int32_t* slot_tok, float* part_score, int32_t* part_count,
                          int64_t warp_chunk, int64_t n_warps, void* stream);

// Pass 2: gate_sum [S, E] and tokens [S] from the slots, summed in warp order (deterministic).
// starts [S + 1]: first sorted position of each sequence (starts[S] = T).
int mu_routing_stats_reduce(const float* slot_gate, const int32_t* slot_tok, const int64_t* starts, int64_t S,
                            int E, int64_t warp_chunk, float* gate_sum, int64_t* tokens, void* stream);

// loramoe_delta forward: out (+)= scale * sum_e gates[:, e] * (x A_e^T) B_e^T.
// x [T, d_in], A [E, r, d_in], B [E, d_out, r], out [T, d_out] share `dtype`; gates [T, E] fp32;
// h_workspace [T, E*r] fp32 (contiguous). All other tensors by strides (in elements).
int mu_loramoe_delta_forward(const void* x, int dtype, int64_t T, int64_t d_in, int64_t sxt, int64_t sxd,
                             const void* A, int64_t E, int64_t r, int64_t sae, int64_t sar, int64_t sad,
                             const void* B, int64_t d_out, int64_t sbe, int64_t sbn, int64_t sbr,
                             const float* gates, int64_t sgt, int64_t sge, float scale, float* h_workspace,
                             void* out, int64_t sot, int64_t son, int accumulate, void* stream);

#ifdef __cplusplus
}
#endif
