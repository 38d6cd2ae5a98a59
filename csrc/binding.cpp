// Torch binding of the CUDA kernels (module moe_unlearn._C). Thin on purpose: allocation and the
// glue (sorting by sequence, offsets, fixed-order sums of partials) live in moe_unlearn/ops/cuda_backend.py;
// this file checks devices/dtypes and hands raw pointers to the C ABI in mu_kernels.h.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>

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

template <typename T>
T* opt_ptr(const std::optional<at::Tensor>& t, const char* name, at::ScalarType type) {
  if (!t.has_value()) return nullptr;
  check_contig(*t, name, type);
  return t->data_ptr<T>();
}

void routing_stats_pass(const at::Tensor& logits, const std::optional<at::Tensor>& perm, const at::Tensor& seq_sorted,
                        const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& topk_in,
                        const std::optional<at::Tensor>& topk_out, int64_t K, bool sigmoid, at::Tensor& slot_gate,
                        at::Tensor& slot_tok, at::Tensor& part_score, at::Tensor& part_count, int64_t warp_chunk,
                        int64_t n_warps) {
  check_cuda(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "moe_unlearn._C: logits must be [T, E]");
  check_contig(seq_sorted, "seq_sorted", at::kInt);
  check_contig(slot_gate, "slot_gate", at::kFloat);
  check_contig(slot_tok, "slot_tok", at::kInt);
  check_contig(part_score, "part_score", at::kFloat);
  check_contig(part_count, "part_count", at::kInt);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int status = mu_routing_stats_pass(
      logits.data_ptr(), dtype_code(logits), logits.size(0), static_cast<int>(logits.size(1)), logits.stride(0),
      logits.stride(1), opt_ptr<int32_t>(perm, "perm", at::kInt), seq_sorted.data_ptr<int32_t>(),
      opt_ptr<uint8_t>(mask, "mask", at::kByte), opt_ptr<int64_t>(topk_in, "topk_in", at::kLong),
      opt_ptr<int64_t>(topk_out, "topk_out", at::kLong), static_cast<int>(K), sigmoid ? 1 : 0,
      slot_gate.data_ptr<float>(), slot_tok.data_ptr<int32_t>(), part_score.data_ptr<float>(),
      part_count.data_ptr<int32_t>(), warp_chunk, n_warps, c10::cuda::getCurrentCUDAStream().stream());
  check_status(status, "routing_stats pass");
}

void routing_stats_reduce(const at::Tensor& slot_gate, const at::Tensor& slot_tok, const at::Tensor& starts,
                          int64_t warp_chunk, at::Tensor& gate_sum, at::Tensor& tokens) {
  check_contig(slot_gate, "slot_gate", at::kFloat);
  check_contig(slot_tok, "slot_tok", at::kInt);
  check_contig(starts, "starts", at::kLong);
  check_contig(gate_sum, "gate_sum", at::kFloat);
  check_contig(tokens, "tokens", at::kLong);
  const c10::cuda::CUDAGuard guard(gate_sum.device());
  const int status = mu_routing_stats_reduce(
      slot_gate.data_ptr<float>(), slot_tok.data_ptr<int32_t>(), starts.data_ptr<int64_t>(), gate_sum.size(0),
      static_cast<int>(gate_sum.size(1)), warp_chunk, gate_sum.data_ptr<float>(), tokens.data_ptr<int64_t>(),
      c10::cuda::getCurrentCUDAStream().stream());
  check_status(status, "routing_stats reduce");
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
  m.doc() = "moe-unlearn CUDA kernels (routing_stats, loramoe_delta forward)";
  m.attr("ROUTING_MAX_EXPERTS") = MU_ROUTING_MAX_EXPERTS;
  m.def("routing_stats_pass", &routing_stats_pass);
  m.def("routing_stats_reduce", &routing_stats_reduce);
  m.def("loramoe_delta_forward", &loramoe_delta_forward);
}
