// Registers the megamoe:: operators once, with one implementation per device, so that
// torch.ops.megamoe.permute(...) runs the CPU or CUDA kernel according to its inputs' device.
// Importing the Python module megamoe._C loads this library, which runs the registrations.
#include <torch/extension.h>
#include <torch/library.h>

#include "dispatch.h"

TORCH_LIBRARY(megamoe, m) {
  m.def("make_routing(Tensor topk_idx, int num_experts) -> (Tensor row_id_map, Tensor tokens_per_expert)");
  m.def("permute(Tensor x, Tensor row_id_map, int topk, int num_rows=-1) -> Tensor");
  m.def("unpermute(Tensor y, Tensor row_id_map, Tensor? scores, int topk, float scale) -> Tensor");
  m.def(
      "unpermute_backward(Tensor grad_out, Tensor y, Tensor row_id_map, Tensor scores, int topk, "
      "float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(megamoe, CPU, m) {
  m.impl("make_routing", &megamoe::make_routing_cpu);
  m.impl("permute", &megamoe::permute_cpu);
  m.impl("unpermute", &megamoe::unpermute_cpu);
  m.impl("unpermute_backward", &megamoe::unpermute_backward_cpu);
}

#ifdef MEGAMOE_WITH_CUDA
TORCH_LIBRARY_IMPL(megamoe, CUDA, m) {
  m.impl("make_routing", &megamoe::make_routing_cuda);
  m.impl("permute", &megamoe::permute_cuda);
  m.impl("unpermute", &megamoe::unpermute_cuda);
  m.impl("unpermute_backward", &megamoe::unpermute_backward_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "megamoe token dispatch/combine kernels. Importing this module registers "
      "torch.ops.megamoe.{make_routing, permute, unpermute, unpermute_backward}; use megamoe.model.moe.dispatch.";
  m.attr("max_routing_experts") = megamoe::kMaxRoutingExperts;
#ifdef MEGAMOE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
