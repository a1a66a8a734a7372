// CPU kernels of the three public ops, registered on the CPU dispatch key.
//
// row(i) is what the forward pass reads for vocabulary id i: reserved_weight[slot_map[i]] rounded to the
// table dtype T when slot_map[i] >= 0, else weight[i] (times weight_scaler[i], rounded to T, for an int8
// table). Bad ids raise IndexError naming the value and the range before anything is written.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace reserved_kernels {
namespace {

// Above this many output elements a float table's frozen rows go through ATen's vectorised copy; below it one
// fused pass costs less than the two extra dispatches (host time at small N is what a training step sees).
constexpr int64_t kBulkElements = 1 << 16;

template <typename T, typename W, typename R>
struct Rows {
  const W* weight;
  const R* reserved;
  const int32_t* slot_map;
  const T* scaler;
  int64_t dim;

  T value(int64_t id, int32_t slot, int64_t c) const {
    if (slot >= 0) return static_cast<T>(reserved[slot * dim + c]);
    if constexpr (std::is_same_v<W, int8_t>) {
      using acc_t = at::opmath_type<T>;
      // gemma_pytorch: `weight * weight_scaler.unsqueeze(-1)`, int8 converted exactly, one rounding to T.
      return static_cast<T>(static_cast<acc_t>(weight[id * dim + c]) * static_cast<acc_t>(scaler[id]));
    } else {
      return weight[id * dim + c];
    }
  }
};

// Calls fn(Rows<T, W, R>{...}) for the table's element types.
template <typename T, typename F>
void with_rows(const at::Tensor& weight, const at::Tensor& reserved, const at::Tensor& slot_map,
               const std::optional<at::Tensor>& scaler, F&& fn) {
  const int64_t dim = weight.size(1);
  const int32_t* slots = slot_map.data_ptr<int32_t>();
  auto with_reserved = [&](auto weight_tag) {
    using W = decltype(weight_tag);
    const W* w = weight.data_ptr<W>();
    const T* s = scaler.has_value() ? scaler->data_ptr<T>() : nullptr;
    if (reserved.scalar_type() == at::kFloat && !std::is_same_v<T, float>) {
      fn(Rows<T, W, float>{w, reserved.data_ptr<float>(), slots, s, dim});
    } else {
      fn(Rows<T, W, T>{w, reserved.data_ptr<T>(), slots, s, dim});
    }
  };
  if (scaler.has_value()) {
    with_reserved(int8_t{});
  } else {
    with_reserved(T{});
  }
}

// The slot of every id, after checking that the id is in [0, V) and its slot is a row of reserved_weight.
template <typename I>
std::vector<int32_t> checked_slots(const I* ids, int64_t n, const int32_t* slot_map, int64_t vocab, int64_t num_slots,
                                   const char* name) {
  std::vector<int32_t> slots(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = static_cast<int64_t>(ids[i]);
    TORCH_CHECK_INDEX(id >= 0 && id < vocab, name, " must lie in [0, ", vocab, "), got ", id);
    const int32_t slot = slot_map[id];
    TORCH_CHECK_VALUE(slot < num_slots, "slot_map[", id, "] = ", slot, " is not a row of reserved_weight (K=",
                      num_slots, ")");
    slots[i] = slot;
  }
  return slots;
}

at::Tensor gather_cpu(const at::Tensor& ids_in, const at::Tensor& weight, const at::Tensor& reserved,
                      const at::Tensor& slot_map, const std::optional<at::Tensor>& scaler, double scale) {
  check_gather(ids_in, weight, reserved, slot_map, scaler);
  const at::Tensor ids = ids_in.contiguous();
  const int64_t n = ids.numel(), vocab = weight.size(0), dim = weight.size(1), num_slots = reserved.size(0);
  const auto dtype = table_dtype(weight, scaler);
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(dim);
  at::Tensor out = at::empty(shape, weight.options().dtype(dtype));
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "reserved_kernels::gather", [&] {
    const index_t* id_ptr = ids.data_ptr<index_t>();
    const std::vector<int32_t> slots =
        checked_slots(id_ptr, n, slot_map.data_ptr<int32_t>(), vocab, num_slots, "ids");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "reserved_kernels::gather", [&] {
      using T = scalar_t;
      using acc_t = at::opmath_type<T>;
      const acc_t s = static_cast<acc_t>(rounded_scale<T>(scale));
      T* o = out.data_ptr<T>();
      const bool float_table = !scaler.has_value();
      if (float_table && n * dim >= kBulkElements) {
        // Frozen rows in bulk: ATen's vectorised, parallel copy and multiply (what F.embedding * scale runs);
        // the product of two values of T rounds once either way, so the bits are the same.
        at::Tensor flat = out.view({n, dim});
        at::index_select_out(flat, weight, 0, ids.view(-1));
        if (s != acc_t(1)) flat.mul_(static_cast<double>(s));
      }
      with_rows<T>(weight, reserved, slot_map, scaler, [&](auto rows) {
        const bool bulk_done = float_table && n * dim >= kBulkElements;
        const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1));
        at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            if (bulk_done && slots[i] < 0) continue;
            const int64_t id = static_cast<int64_t>(id_ptr[i]);
            for (int64_t c = 0; c < dim; ++c) {
              // The product of two values of T is exact in acc_t: one rounding, as `embedding * tensor(scale)`.
              o[i * dim + c] = static_cast<T>(static_cast<acc_t>(rows.value(id, slots[i], c)) * s);
            }
          }
        });
      });
    });
  });
  return out;
}

at::Tensor scatter_grad_cpu(const at::Tensor& grad_out, const at::Tensor& ids_in, const at::Tensor& slot_map,
                            int64_t num_slots, double scale, at::ScalarType out_dtype) {
  check_scatter(grad_out, ids_in, slot_map, num_slots, out_dtype);
  const at::Tensor ids = ids_in.contiguous();
  const int64_t n = ids.numel(), dim = grad_out.size(-1), vocab = slot_map.size(0);
  const at::Tensor grad = grad_out.contiguous();
  at::Tensor out = at::empty({num_slots, dim}, grad.options().dtype(out_dtype));
  // The tokens that hit a reserved row, in token order (the backward never re-validates ids: an id
  // outside [0, V) or a slot outside [0, K) is simply not a hit).
  std::vector<int64_t> hit_token;
  std::vector<int32_t> hit_slot;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "reserved_kernels::scatter_grad", [&] {
    const index_t* id_ptr = ids.data_ptr<index_t>();
    const int32_t* slots = slot_map.data_ptr<int32_t>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = static_cast<int64_t>(id_ptr[i]);
      if (id < 0 || id >= vocab) continue;
      const int32_t slot = slots[id];
      if (slot >= 0 && slot < num_slots) {
        hit_token.push_back(i);
        hit_slot.push_back(slot);
      }
    }
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "reserved_kernels::scatter_grad", [&] {
    using G = scalar_t;
    using acc_t = at::opmath_type<G>;
    const G* g = grad.data_ptr<G>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "reserved_kernels::scatter_grad_out", [&] {
      using O = scalar_t;
      O* o = out.data_ptr<O>();
      // Columns are independent: each is summed over the hits in token order, so threads never change the result.
      at::parallel_for(0, dim, 64, [&](int64_t begin, int64_t end) {
        const int64_t width = end - begin;
        std::vector<acc_t> acc(static_cast<size_t>(num_slots * width), acc_t(0));
        for (size_t h = 0; h < hit_token.size(); ++h) {
          const G* row = g + hit_token[h] * dim + begin;
          acc_t* sum = acc.data() + hit_slot[h] * width;
          for (int64_t c = 0; c < width; ++c) sum[c] += static_cast<acc_t>(row[c]);
        }
        for (int64_t k = 0; k < num_slots; ++k) {
          for (int64_t c = 0; c < width; ++c) {
            o[k * dim + begin + c] = static_cast<O>(acc[k * width + c] * static_cast<acc_t>(scale));
          }
        }
      });
    });
  });
  return out;
}

at::Tensor segment_mean_cpu(const at::Tensor& weight, const at::Tensor& reserved, const at::Tensor& slot_map,
                            const std::optional<at::Tensor>& scaler, const at::Tensor& offsets_in,
                            const at::Tensor& src_in) {
  check_segment_mean(weight, reserved, slot_map, scaler, offsets_in, src_in);
  const at::Tensor offsets = offsets_in.contiguous(), src = src_in.contiguous();
  const int64_t num_segments = offsets.size(0) - 1, num_ids = src.size(0), dim = weight.size(1);
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(off[0] == 0 && off[num_segments] == num_ids, "offsets must start at 0 and end at len(src_ids)=",
                    num_ids, ", got ", off[0], " … ", off[num_segments]);
  std::vector<int64_t> empty;
  for (int64_t k = 0; k < num_segments && empty.size() < 10; ++k) {
    if (off[k + 1] <= off[k]) empty.push_back(k);
  }
  TORCH_CHECK_VALUE(empty.empty(), "every destination needs at least one source id; destinations ",
                    c10::IntArrayRef(empty), " have none");
  const auto dtype = table_dtype(weight, scaler);
  at::Tensor out = at::empty({num_segments, dim}, weight.options().dtype(sum_dtype(dtype)));
  AT_DISPATCH_INDEX_TYPES(src.scalar_type(), "reserved_kernels::segment_mean", [&] {
    const index_t* id_ptr = src.data_ptr<index_t>();
    const std::vector<int32_t> slots =
        checked_slots(id_ptr, num_ids, slot_map.data_ptr<int32_t>(), weight.size(0), reserved.size(0), "src_ids");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "reserved_kernels::segment_mean", [&] {
      using T = scalar_t;
      using acc_t = at::opmath_type<T>;
      acc_t* o = out.data_ptr<acc_t>();
      with_rows<T>(weight, reserved, slot_map, scaler, [&](auto rows) {
        at::parallel_for(0, num_segments, 1, [&](int64_t begin, int64_t end) {
          for (int64_t k = begin; k < end; ++k) {
            acc_t* sum = o + k * dim;
            std::fill(sum, sum + dim, acc_t(0));
            for (int64_t j = off[k]; j < off[k + 1]; ++j) {
              const int64_t id = static_cast<int64_t>(id_ptr[j]);
              for (int64_t c = 0; c < dim; ++c) sum[c] += static_cast<acc_t>(rows.value(id, slots[j], c));
            }
            const acc_t count = static_cast<acc_t>(off[k + 1] - off[k]);
            for (int64_t c = 0; c < dim; ++c) sum[c] /= count;
          }
        });
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(reserved_kernels, CPU, m) {
  m.impl("gather", &gather_cpu);
  m.impl("scatter_grad", &scatter_grad_cpu);
  m.impl("segment_mean", &segment_mean_cpu);
}

}  // namespace reserved_kernels
