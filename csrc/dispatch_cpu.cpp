// CPU kernels for token dispatch/combine (see dispatch.h for the semantics).
// Parallel over tokens: each token's k copies touch disjoint output rows, so no two threads write
// the same memory. These are the reference-speed path for tests and CPU runs, not tuned further.
#include "dispatch.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace megamoe {
namespace {

// Tokens per parallel chunk, so that one chunk moves roughly at::internal::GRAIN_SIZE elements.
int64_t token_grain(int64_t d, int64_t topk) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, d * topk));
}

// The map comes from make_routing, but a bad one would write out of bounds. Checked once up front,
// O(T*k) next to the O(T*k*d) copy, so that nothing throws inside the parallel loops. Rows are
// -1 (dropped) or in [0, num_rows), and the kept copies fill the buffer (no row left unwritten).
void check_map_range(const at::Tensor& map, int64_t num_rows) {
  const int32_t* m = map.const_data_ptr<int32_t>();
  int64_t kept = 0;
  for (int64_t i = 0; i < map.numel(); ++i) {
    TORCH_CHECK(m[i] == kDropped || (m[i] >= 0 && m[i] < num_rows), "megamoe: row_id_map[", i, "] = ", m[i],
                " is out of range [0, ", num_rows, ") and not -1 (dropped)");
    kept += m[i] != kDropped;
  }
  TORCH_CHECK(kept == num_rows, "megamoe: row_id_map keeps ", kept, " copies but the buffer has ", num_rows,
              " rows (num_rows must be the number of copies that are not dropped)");
}

}  // namespace

// Stable counting sort: rows of expert e start after all experts < e, in copy order. Copies with
// expert -1 are dropped: row -1, not counted.
std::tuple<at::Tensor, at::Tensor> make_routing_cpu(const at::Tensor& topk_idx, int64_t num_experts) {
  check_topk_idx(topk_idx, num_experts);
  const at::Tensor idx = topk_idx.contiguous().to(at::kLong);
  const int64_t n = idx.numel();
  const int64_t* e = idx.const_data_ptr<int64_t>();
  at::Tensor counts = at::zeros({num_experts}, idx.options());
  int64_t* c = counts.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (e[i] == kDropped) continue;
    TORCH_CHECK(e[i] >= 0 && e[i] < num_experts, "megamoe: expert index ", e[i], " is outside [0, ", num_experts,
                ") and not -1 (dropped)");
    ++c[e[i]];
  }
  std::vector<int64_t> next(num_experts);  // next free row of each expert
  for (int64_t x = 0, start = 0; x < num_experts; ++x) {
    next[x] = start;
    start += c[x];
  }
  at::Tensor row_id_map = at::empty({n}, idx.options().dtype(at::kInt));
  int32_t* r = row_id_map.mutable_data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) r[i] = e[i] == kDropped ? kDropped : static_cast<int32_t>(next[e[i]]++);
  return {row_id_map, counts};
}

at::Tensor permute_cpu(const at::Tensor& x_in, const at::Tensor& map_in, int64_t topk, int64_t num_rows_in) {
  check_row_id_map(map_in, topk);
  check_same_device(x_in, map_in, "row_id_map");
  const int64_t T = map_in.numel() / topk;
  check_rows(x_in, T, "x");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor map = map_in.contiguous();
  const int64_t d = x.size(1);
  const int64_t num_rows = resolve_num_rows(num_rows_in, T * topk);
  check_map_range(map, num_rows);
  at::Tensor out = at::empty({num_rows, d}, x.options());
  if (out.numel() == 0) return out;

  const int32_t* m = map.const_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "megamoe_permute_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, token_grain(d, topk), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t j = 0; j < topk; ++j) {
          const int64_t row = m[t * topk + j];
          if (row == kDropped) continue;
          std::memcpy(dst + row * d, src + t * d, d * sizeof(scalar_t));
        }
      }
    });
  });
  return out;
}

at::Tensor unpermute_cpu(const at::Tensor& y_in, const at::Tensor& map_in,
                         const std::optional<at::Tensor>& scores_in, int64_t topk, double scale) {
  check_row_id_map(map_in, topk);
  check_same_device(y_in, map_in, "row_id_map");
  const int64_t T = map_in.numel() / topk;
  check_buffer(y_in, T * topk, "y");
  const int64_t num_rows = y_in.size(0);
  const at::Tensor y = y_in.contiguous();
  const at::Tensor map = map_in.contiguous();
  check_map_range(map, num_rows);
  const int64_t d = y.size(1);
  // Scores are read in the accumulation dtype whatever their own dtype (fp32 scores with bf16 y).
  at::Tensor scores;
  if (scores_in.has_value()) {
    check_same_device(y_in, *scores_in, "scores");
    check_scores(*scores_in, T, topk);
    scores = scores_in->to(acc_type(y.scalar_type())).contiguous();
  }
  at::Tensor out = at::empty({T, d}, y.options());
  if (out.numel() == 0) return out;

  const int32_t* m = map.const_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "megamoe_unpermute_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = y.const_data_ptr<scalar_t>();
    const acc_t* s = scores.defined() ? scores.const_data_ptr<acc_t>() : nullptr;
    const acc_t sc = static_cast<acc_t>(scale);
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, token_grain(d, topk), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < topk; ++j) {
          const int64_t i = t * topk + j;
          if (m[i] == kDropped) continue;
          const scalar_t* yr = src + static_cast<int64_t>(m[i]) * d;
          const acc_t w = s ? sc * s[i] : acc_t(1);
          for (int64_t c = 0; c < d; ++c) acc[c] += w * static_cast<acc_t>(yr[c]);
        }
        scalar_t* o = dst + t * d;
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_in, const at::Tensor& y_in,
                                                          const at::Tensor& map_in,
                                                          const at::Tensor& scores_in, int64_t topk,
                                                          double scale) {
  check_row_id_map(map_in, topk);
  check_same_device(y_in, map_in, "row_id_map");
  check_same_device(y_in, grad_in, "grad_out");
  check_same_device(y_in, scores_in, "scores");
  const int64_t T = map_in.numel() / topk;
  check_buffer(y_in, T * topk, "y");
  const int64_t num_rows = y_in.size(0);
  check_rows(grad_in, T, "grad_out");
  check_scores(scores_in, T, topk);
  TORCH_CHECK(grad_in.size(1) == y_in.size(1) && grad_in.scalar_type() == y_in.scalar_type(),
              "megamoe: grad_out must match y in hidden size and dtype");
  const at::Tensor g = grad_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const at::Tensor map = map_in.contiguous();
  check_map_range(map, num_rows);
  const at::ScalarType acc = acc_type(y.scalar_type());
  const at::Tensor scores = scores_in.to(acc).contiguous();
  const int64_t d = y.size(1);
  at::Tensor grad_y = at::empty_like(y);
  at::Tensor grad_scores = at::empty({T, topk}, scores.options());
  if (T > 0) {
    const int32_t* m = map.const_data_ptr<int32_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "megamoe_unpermute_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const acc_t* s = scores.const_data_ptr<acc_t>();
      const acc_t sc = static_cast<acc_t>(scale);
      scalar_t* gy = grad_y.mutable_data_ptr<scalar_t>();
      acc_t* gs = grad_scores.mutable_data_ptr<acc_t>();
      at::parallel_for(0, T, token_grain(d, topk), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const scalar_t* gr = gp + t * d;
          for (int64_t j = 0; j < topk; ++j) {
            const int64_t i = t * topk + j;
            const int64_t row = m[i];
            if (row == kDropped) {
              gs[i] = 0;
              continue;
            }
            const scalar_t* yr = yp + row * d;
            scalar_t* out = gy + row * d;
            const acc_t w = sc * s[i];
            acc_t dot = 0;
            for (int64_t c = 0; c < d; ++c) {
              const acc_t gc = static_cast<acc_t>(gr[c]);
              dot += gc * static_cast<acc_t>(yr[c]);
              out[c] = static_cast<scalar_t>(w * gc);
            }
            gs[i] = sc * dot;
          }
        }
      });
    });
  }
  return {grad_y, grad_scores.to(scores_in.scalar_type())};
}

}  // namespace megamoe
