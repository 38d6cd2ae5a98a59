// Torch binding of the CUDA kernels (module moe_unlearn._C). Thin on purpose: allocation lives in
// moe_unlearn/ops/cuda_backend.py;
// this file checks devices/dtypes and hands raw pointers to the C ABI in mu_kernels.h.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "mu_kernels.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return MU_F32;
    case at::kHalf: return MU_F16;
    case at::kBFloat16: return MU_BF16;
    default: TORCH_CHECK(false, "moe_unlearn._C: expected float32/float16/bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "moe_unlearn._C: ", name, " must be a CUDA tensor");
}

void check_contig(const at::Tensor& t, const char* name, at::ScalarType type) {
  check_cuda(t, name);
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == type, "moe_unlearn._C: ", name, " must be contiguous ", type);
}

void check_status(int status, const char* what) {
  TORCH_CHECK(status == 0, "moe_unlearn._C: ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
}

void loramoe_delta_forward(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& gates,
                           double scale, at::Tensor& h, at::Tensor& out, bool accumulate) {
  check_cuda(x, "x");
  check_cuda(A, "A");
  check_cuda(B, "B");
  check_cuda(gates, "gates");
  check_cuda(out, "out");
  TORCH_CHECK(A.scalar_type() == x.scalar_type() && B.scalar_type() == x.scalar_type() &&
                  out.scalar_type() == x.scalar_type(),
              "moe_unlearn._C: x, A, B and out must share a dtype");
  TORCH_CHECK(gates.scalar_type() == at::kFloat, "moe_unlearn._C: gates must be float32");
  check_contig(h, "h", at::kFloat);
  const c10::cuda::CUDAGuard guard(x.device());
  const int status = mu_loramoe_delta_forward(
      x.data_ptr(), dtype_code(x), x.size(0), x.size(1), x.stride(0), x.stride(1), A.data_ptr(), A.size(0),
      A.size(1), A.stride(0), A.stride(1), A.stride(2), B.data_ptr(), B.size(1), B.stride(0), B.stride(1),
      B.stride(2), gates.data_ptr<float>(), gates.stride(0), gates.stride(1), static_cast<float>(scale),
      h.data_ptr<float>(), out.data_ptr(), out.stride(0), out.stride(1), accumulate ? 1 : 0,
      c10::cuda::getCurrentCUDAStream().stream());
  check_status(status, "loramoe_delta forward");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moe-unlearn CUDA kernels (loramoe_delta forward)";
  m.def("loramoe_delta_forward", &loramoe_delta_forward);
}
