// Token dispatch (permute) and combine (weighted unpermute) for MoE layers.
//
// Routing (make_routing): a stable counting sort of the flattened expert ids topk_idx[T,k] gives
// row_id_map (int32) and tokens_per_expert[E] (int64), with no host synchronisation.
//
// Shapes: T tokens, hidden size d, each token routed to k experts. Copy (t, j) of token t has
// flat index i = t*k + j; row_id_map[i] (int32) is its row in the expert-sorted buffer of N rows.
//
// Dropped copies: an expert id of -1 (kDropped) in topk_idx means "copy (t, j) goes nowhere" (the
// expert-parallel layer marks the copies that other ranks serve this way). make_routing gives them
// row -1 and does not count them, so the buffer has N = T*k - (dropped) rows; every op skips them
// (unpermute adds nothing, unpermute_backward gives them a zero score gradient). N must be the
// number of kept copies: the CPU ops check it, the CUDA kernels assert that rows are below N.
//
//   permute(x[T,d], map, k, N)              -> out[N,d],  out[map[t*k+j]] = x[t]     (N = -1: T*k)
//   unpermute(y[N,d], map, scores?, k, s)   -> out[T,d],  out[t] = sum_j s*scores[t,j]*y[map[t*k+j]]
//                                                         (plain sum when scores is absent)
//   unpermute_backward(g[T,d], y, map, scores, k, s)
//        -> grad_y[map[t*k+j]] = s*scores[t,j]*g[t],  grad_scores[t,j] = s*dot(g[t], y[map[t*k+j]])
//
// The backward of permute is unpermute without scores; the backward of unpermute without scores
// is permute. All sums are accumulated in at::opmath_type (fp32 for 16-bit types, double for double).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace megamoe {

// Expert id / row of a dropped copy.
constexpr int64_t kDropped = -1;

// The CUDA routing kernel keeps 33 counters per expert in shared memory (48 KiB at most).
constexpr int64_t kMaxRoutingExperts = 256;

// --- argument checks shared by the CPU and CUDA implementations -------------------------------

inline void check_row_id_map(const at::Tensor& row_id_map, int64_t topk) {
  TORCH_CHECK(topk >= 1, "megamoe: topk must be >= 1, got ", topk);
  TORCH_CHECK(row_id_map.dim() == 1, "megamoe: row_id_map must be 1-D, got shape ", row_id_map.sizes());
  TORCH_CHECK(row_id_map.scalar_type() == at::kInt, "megamoe: row_id_map must be int32, got ",
              row_id_map.scalar_type());
  TORCH_CHECK(row_id_map.numel() % topk == 0, "megamoe: row_id_map has ", row_id_map.numel(),
              " entries, not a multiple of topk=", topk);
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.device() == b.device(), "megamoe: ", name, " is on ", b.device(), " but the input is on ",
              a.device());
}

inline void check_rows(const at::Tensor& t, int64_t rows, const char* name) {
  TORCH_CHECK(t.dim() == 2, "megamoe: ", name, " must be 2-D [rows, hidden], got shape ", t.sizes());
  TORCH_CHECK(t.size(0) == rows, "megamoe: ", name, " has ", t.size(0), " rows, expected ", rows);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "megamoe: ", name, " must be floating point, got ",
              t.scalar_type());
}

// The permuted buffer's row count: num_rows, or T*k (no dropped copies) when num_rows is -1.
inline int64_t resolve_num_rows(int64_t num_rows, int64_t num_copies) {
  TORCH_CHECK(num_rows >= -1 && num_rows <= num_copies, "megamoe: num_rows must be -1 (all T*k copies) or in [0, ",
              num_copies, "], got ", num_rows);
  return num_rows == -1 ? num_copies : num_rows;
}

inline void check_buffer(const at::Tensor& t, int64_t max_rows, const char* name) {
  TORCH_CHECK(t.dim() == 2, "megamoe: ", name, " must be 2-D [rows, hidden], got shape ", t.sizes());
  TORCH_CHECK(t.size(0) <= max_rows, "megamoe: ", name, " has ", t.size(0), " rows, more than the ", max_rows,
              " token copies of row_id_map");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "megamoe: ", name, " must be floating point, got ",
              t.scalar_type());
}

inline void check_scores(const at::Tensor& scores, int64_t num_tokens, int64_t topk) {
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) == num_tokens && scores.size(1) == topk,
              "megamoe: scores must have shape [", num_tokens, ", ", topk, "], got ", scores.sizes());
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), "megamoe: scores must be floating point, got ",
              scores.scalar_type());
}

inline void check_topk_idx(const at::Tensor& topk_idx, int64_t num_experts) {
  TORCH_CHECK(topk_idx.dim() == 2, "megamoe: topk_idx must be 2-D [tokens, k], got shape ", topk_idx.sizes());
  TORCH_CHECK(topk_idx.scalar_type() == at::kLong || topk_idx.scalar_type() == at::kInt,
              "megamoe: topk_idx must be int64 or int32, got ", topk_idx.scalar_type());
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxRoutingExperts, "megamoe: num_experts must be in [1, ",
              kMaxRoutingExperts, "], got ", num_experts);
  TORCH_CHECK(topk_idx.numel() < (int64_t{1} << 31), "megamoe: too many token copies for an int32 row_id_map");
}

// The dtype in which sums are accumulated (and scores are read) for inputs of dtype `t`.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// --- CPU (dispatch_cpu.cpp) -------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> make_routing_cpu(const at::Tensor& topk_idx, int64_t num_experts);

at::Tensor permute_cpu(const at::Tensor& x, const at::Tensor& row_id_map, int64_t topk, int64_t num_rows);
at::Tensor unpermute_cpu(const at::Tensor& y, const at::Tensor& row_id_map,
                         const std::optional<at::Tensor>& scores, int64_t topk, double scale);
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_out, const at::Tensor& y,
                                                          const at::Tensor& row_id_map,
                                                          const at::Tensor& scores, int64_t topk,
                                                          double scale);

// --- CUDA (dispatch_cuda.cu), built only with -DMEGAMOE_WITH_CUDA -----------------------------

#ifdef MEGAMOE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> make_routing_cuda(const at::Tensor& topk_idx, int64_t num_experts);
at::Tensor permute_cuda(const at::Tensor& x, const at::Tensor& row_id_map, int64_t topk, int64_t num_rows);
at::Tensor unpermute_cuda(const at::Tensor& y, const at::Tensor& row_id_map,
                          const std::optional<at::Tensor>& scores, int64_t topk, double scale);
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_out, const at::Tensor& y,
                                                           const at::Tensor& row_id_map,
                                                           const at::Tensor& scores, int64_t topk,
                                                           double scale);
#endif

}  // namespace megamoe
