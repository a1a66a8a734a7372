// Argument checks and small helpers shared by the CPU kernels, the CUDA kernels and the autograd layer.
//
// Every public op checks its arguments here, once, with the same messages as the Python fallback
// (reserved_kernels/ops/__init__.py): TORCH_CHECK_TYPE raises TypeError, TORCH_CHECK_VALUE ValueError and
// TORCH_CHECK_INDEX IndexError in Python. These checks read shapes and dtypes only, never device memory.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <optional>

namespace reserved_kernels {

#define RK_CHECK_SAME_DEVICE(x, y)                                                                      \
  TORCH_CHECK_VALUE((x).device() == (y).device(), "all tensors must be on one device, got " #x " on ", \
                    (x).device(), ", " #y " on ", (y).device())
#define RK_CHECK_CONTIGUOUS(x) TORCH_CHECK_VALUE((x).is_contiguous(), #x " must be contiguous")
#define RK_CHECK_INDEX_DTYPE(x, name)                                                             \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kInt || (x).scalar_type() == at::kLong, name " must be " \
                   "an int32 or int64 tensor, got ", (x).scalar_type())

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The dtype of the rows the forward pass produces: the table's, or the per-row scales' for an int8 table.
inline at::ScalarType table_dtype(const at::Tensor& weight, const std::optional<at::Tensor>& scaler) {
  return scaler.has_value() ? scaler->scalar_type() : weight.scalar_type();
}

// The table (weight, reserved_weight, slot_map, weight_scaler) as every op reads it.
inline void check_table(const at::Tensor& weight, const at::Tensor& reserved, const at::Tensor& slot_map,
                        const std::optional<at::Tensor>& scaler) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (V, D), got shape ", weight.sizes());
  TORCH_CHECK_VALUE(reserved.dim() == 2 && reserved.size(1) == weight.size(1), "reserved_weight must be (K, ",
                    weight.size(1), "), got shape ", reserved.sizes());
  TORCH_CHECK_TYPE(is_float_type(reserved.scalar_type()), "reserved_weight must be floating point, got ",
                   reserved.scalar_type());
  if (scaler.has_value()) {
    TORCH_CHECK_TYPE(weight.scalar_type() == at::kChar, "weight_scaler is for an int8 table, but weight is ",
                     weight.scalar_type());
    TORCH_CHECK_VALUE(scaler->dim() == 1 && scaler->size(0) == weight.size(0) && is_float_type(scaler->scalar_type()),
                      "weight_scaler must be a floating (", weight.size(0), ",) vector, got ", scaler->scalar_type(),
                      " ", scaler->sizes());
    RK_CHECK_CONTIGUOUS(*scaler);
    RK_CHECK_SAME_DEVICE(weight, *scaler);
  } else {
    TORCH_CHECK_TYPE(is_float_type(weight.scalar_type()), "an integer table (", weight.scalar_type(),
                     ") needs weight_scaler (per-row scales)");
  }
  const auto dtype = table_dtype(weight, scaler);
  TORCH_CHECK_TYPE(reserved.scalar_type() == dtype || reserved.scalar_type() == at::kFloat,
                   "reserved_weight must have the table's dtype (", dtype, ") or float32, got ",
                   reserved.scalar_type());
  TORCH_CHECK_VALUE(slot_map.scalar_type() == at::kInt && slot_map.dim() == 1 && slot_map.size(0) == weight.size(0),
                    "slot_map must be an int32 (", weight.size(0), ",) vector, got ", slot_map.scalar_type(), " ",
                    slot_map.sizes());
  RK_CHECK_CONTIGUOUS(weight);
  RK_CHECK_CONTIGUOUS(reserved);
  RK_CHECK_CONTIGUOUS(slot_map);
  RK_CHECK_SAME_DEVICE(weight, reserved);
  RK_CHECK_SAME_DEVICE(weight, slot_map);
}

inline void check_gather(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& reserved,
                         const at::Tensor& slot_map, const std::optional<at::Tensor>& scaler) {
  RK_CHECK_INDEX_DTYPE(ids, "ids");
  check_table(weight, reserved, slot_map, scaler);
  RK_CHECK_SAME_DEVICE(ids, weight);
}

inline void check_scatter(const at::Tensor& grad, const at::Tensor& ids, const at::Tensor& slot_map,
                          int64_t num_slots, at::ScalarType out_dtype) {
  RK_CHECK_INDEX_DTYPE(ids, "ids");
  TORCH_CHECK_VALUE(grad.dim() == ids.dim() + 1 && grad.sizes().slice(0, ids.dim()) == ids.sizes(),
                    "grad_out must have shape ids.shape + (D,) = ", ids.sizes(), " + (D,), got ", grad.sizes());
  TORCH_CHECK_TYPE(is_float_type(grad.scalar_type()), "grad_out must be floating point, got ", grad.scalar_type());
  TORCH_CHECK_TYPE(is_float_type(out_dtype), "out_dtype must be floating point, got ", out_dtype);
  TORCH_CHECK_VALUE(slot_map.scalar_type() == at::kInt && slot_map.dim() == 1,
                    "slot_map must be an int32 vector, got ", slot_map.scalar_type(), " of shape ", slot_map.sizes());
  TORCH_CHECK_VALUE(num_slots >= 0, "num_slots must be >= 0, got ", num_slots);
  TORCH_CHECK_VALUE(ids.numel() < (int64_t{1} << 31), "scatter_grad supports fewer than 2**31 tokens, got ",
                    ids.numel());
  RK_CHECK_CONTIGUOUS(slot_map);
  RK_CHECK_SAME_DEVICE(grad, ids);
  RK_CHECK_SAME_DEVICE(grad, slot_map);
}

inline void check_segment_mean(const at::Tensor& weight, const at::Tensor& reserved, const at::Tensor& slot_map,
                               const std::optional<at::Tensor>& scaler, const at::Tensor& offsets,
                               const at::Tensor& src_ids) {
  check_table(weight, reserved, slot_map, scaler);
  RK_CHECK_INDEX_DTYPE(src_ids, "src_ids");
  TORCH_CHECK_VALUE(src_ids.dim() == 1, "src_ids must be 1-D, got shape ", src_ids.sizes());
  TORCH_CHECK_VALUE(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.size(0) >= 1,
                    "offsets must be a non-empty int64 vector, got ", offsets.scalar_type(), " of shape ",
                    offsets.sizes());
  RK_CHECK_SAME_DEVICE(weight, offsets);
  RK_CHECK_SAME_DEVICE(weight, src_ids);
}

// `scale` rounded to T through float, as `torch.tensor(scale, dtype=T)` rounds it (Gemma's √D normaliser).
template <typename T>
inline double rounded_scale(double scale) {
  if constexpr (std::is_same_v<T, double>) {
    return scale;
  } else {
    return static_cast<double>(static_cast<float>(static_cast<T>(static_cast<float>(scale))));
  }
}

inline double rounded_scale(double scale, at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return rounded_scale<c10::Half>(scale);
    case at::kBFloat16: return rounded_scale<c10::BFloat16>(scale);
    case at::kFloat: return rounded_scale<float>(scale);
    default: return scale;
  }
}

// The accumulation type of sums over rows of T: float for 16- and 32-bit tables, double for float64.
inline at::ScalarType sum_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace reserved_kernels
