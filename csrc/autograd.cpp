// The Autograd kernels of the public ops: a call goes from the dispatcher to the device kernel without Python.
//
// gather's backward is scatter_grad: grad_reserved[k] = scale * Σ grad_out[n] over the tokens whose id has
// slot k, a (K, D) tensor of reserved_weight's dtype. The frozen table never gets a gradient: a weight that
// requires grad is refused (only the K reserved rows train). scatter_grad and segment_mean are not
// differentiable.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "common.h"

namespace reserved_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_gather(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& reserved,
                       const at::Tensor& slot_map, const std::optional<at::Tensor>& scaler, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("reserved_kernels::gather", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, double)>();
  return op.call(ids, weight, reserved, slot_map, scaler, scale);
}

at::Tensor call_scatter_grad(const at::Tensor& grad, const at::Tensor& ids, const at::Tensor& slot_map,
                             int64_t num_slots, double scale, at::ScalarType out_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("reserved_kernels::scatter_grad", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
                                         at::ScalarType)>();
  return op.call(grad, ids, slot_map, num_slots, scale, out_dtype);
}

class Gather : public torch::autograd::Function<Gather> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& ids, const at::Tensor& weight,
                            const at::Tensor& reserved, const at::Tensor& slot_map,
                            const std::optional<at::Tensor>& scaler, double scale) {
    ctx->save_for_backward({ids, slot_map});
    ctx->saved_data["num_slots"] = reserved.size(0);
    // d out / d row is the scale rounded to the output dtype, the factor the forward multiplied by.
    ctx->saved_data["scale"] = rounded_scale(scale, table_dtype(weight, scaler));
    ctx->saved_data["dtype"] = static_cast<int64_t>(reserved.scalar_type());
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_gather(ids, weight, reserved, slot_map, scaler, scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_reserved;
    if (ctx->needs_input_grad(2)) {
      grad_reserved = call_scatter_grad(grads[0], saved[0], saved[1], ctx->saved_data["num_slots"].toInt(),
                                        ctx->saved_data["scale"].toDouble(),
                                        static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt()));
    }
    return {at::Tensor(), at::Tensor(), grad_reserved, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor gather_autograd(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& reserved,
                           const at::Tensor& slot_map, const std::optional<at::Tensor>& scaler, double scale) {
  // Checked here, not in forward(): autograd runs forward() with gradients disabled.
  TORCH_CHECK(!(weight.requires_grad() && at::GradMode::is_enabled()),
              "the frozen table (weight) requires grad, but only the K reserved rows of a ReservedEmbedding "
              "train: set weight.requires_grad_(False). (PEFT's modules_to_save=['embed_tokens'] makes a V x D "
              "trainable copy of the table: leave the embedding out of modules_to_save.)");
  return Gather::apply(ids, weight, reserved, slot_map, scaler, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(reserved_kernels, Autograd, m) {
  m.impl("gather", &gather_autograd);
  m.impl("scatter_grad", torch::autograd::autogradNotImplementedFallback());
  m.impl("segment_mean", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace reserved_kernels
