// C ABI of the moe-unlearn CUDA kernels. No torch headers: the .cu files compile with plain nvcc
// (CI compile-checks them for sm_90 on a CPU machine); binding.cpp adapts torch tensors to this ABI.
// Every function returns a cudaError_t value (0 = success) and launches on the given stream.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { MU_F32 = 0, MU_F16 = 1, MU_BF16 = 2 };

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
