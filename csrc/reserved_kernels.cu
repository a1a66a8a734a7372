// CUDA kernels of reserved-kernels, registered with TORCH_LIBRARY (no pybind11).
//
// row(i) = reserved[slot_map[i]] when slot_map[i] >= 0, else weight[i] (times scaler[i], rounded to the
// output type, for an int8 table). Ids outside [0, V) read nothing and give zero rows / no gradient.
// All offsets are int64. Threads of one row walk its columns in 16-byte vectors where alignment allows:
// a warp per row for small D, up to a 256-thread block per row for large D.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "checks.h"

namespace reserved_kernels {
namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Threads per row (x) and rows per block (y) for D / vec columns: at most 256 threads per block.
struct Launch {
  dim3 block;
  int64_t rows_per_block;
};

Launch launch_for(int64_t columns) {
  int tx = 32;
  while (tx < 256 && tx < columns) tx *= 2;
  int ty = 256 / tx;
  return {dim3(tx, ty), ty};
}

template <typename T>
int vec_width(int64_t dim, std::initializer_list<const void*> ptrs, int elem_bytes_min) {
  // 16-byte vectors of T when every row start is aligned; the narrowest element (int8) sets the bound.
  int vec = 16 / static_cast<int>(sizeof(T));
  while (vec > 1) {
    bool ok = dim % vec == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % (vec * elem_bytes_min) == 0;
    if (ok) break;
    vec /= 2;
  }
  return vec;
}

// Load VEC values of row(id) at column c (a multiple of VEC) as floats; zero for invalid ids.
template <typename T, typename W, int VEC>
__device__ __forceinline__ void load_row(float (&out)[VEC], int64_t id, bool valid, int64_t c, int64_t dim,
                                         const W* __restrict__ weight, const T* __restrict__ reserved,
                                         const int32_t* __restrict__ slot_map, const T* __restrict__ scaler) {
  if (!valid) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = 0.f;
    return;
  }
  const int32_t slot = slot_map[id];
  if (slot >= 0) {
    const auto r = *reinterpret_cast<const Vec<T, VEC>*>(reserved + static_cast<int64_t>(slot) * dim + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = static_cast<float>(r.v[i]);
  } else {
    const auto w = *reinterpret_cast<const Vec<W, VEC>*>(weight + id * dim + c);
    if constexpr (std::is_same_v<W, int8_t>) {
      const float s = static_cast<float>(scaler[id]);
      // gemma_pytorch rounds the dequantised row to the float dtype before anything else.
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = static_cast<float>(static_cast<T>(static_cast<float>(w.v[i]) * s));
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = static_cast<float>(w.v[i]);
    }
  }
}

// out[n, :] = cast(scale * row(ids[n])). The product of two values of T is exact in fp32, so the one
// rounding here (round to nearest even) matches PyTorch's `embedding(...) * tensor(scale, dtype)`.
template <typename T, typename W, typename I, int VEC>
__global__ void gather_kernel(const I* __restrict__ ids, const W* __restrict__ weight,
                              const T* __restrict__ reserved, const int32_t* __restrict__ slot_map,
                              const T* __restrict__ scaler, T* __restrict__ out, int64_t n, int64_t vocab,
                              int64_t dim, float scale, bool apply_scale) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= n) return;
  const int64_t id = static_cast<int64_t>(ids[row]);
  const bool valid = id >= 0 && id < vocab;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < dim; c += static_cast<int64_t>(blockDim.x) * VEC) {
    float v[VEC];
    load_row<T, W, VEC>(v, id, valid, c, dim, weight, reserved, slot_map, scaler);
    Vec<T, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<T>(apply_scale ? v[i] * scale : v[i]);
    *reinterpret_cast<Vec<T, VEC>*>(out + row * dim + c) = o;
  }
}

// out[slot(ids[n]), :] += scale * grad[n, :] with fp32 atomics; rows of non-reserved tokens are never read.
template <typename T, typename I, int VEC>
__global__ void scatter_atomic_kernel(const T* __restrict__ grad, const I* __restrict__ ids,
                                      const int32_t* __restrict__ slot_map, float* __restrict__ out, int64_t n,
                                      int64_t vocab, int64_t dim, float scale) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= n) return;
  const int64_t id = static_cast<int64_t>(ids[row]);
  if (id < 0 || id >= vocab) return;
  const int32_t slot = slot_map[id];
  if (slot < 0) return;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < dim; c += static_cast<int64_t>(blockDim.x) * VEC) {
    const auto g = *reinterpret_cast<const Vec<T, VEC>*>(grad + row * dim + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) atomicAdd(out + static_cast<int64_t>(slot) * dim + c + i, scale * static_cast<float>(g.v[i]));
  }
}

// partial[p, :] = sum over j in [bounds[p], bounds[p+1]) of src_row(index[j]), in order (deterministic).
// src_row is row(i) of the table when FROM_TABLE, else src[i] (gradient rows).
template <typename T, typename W, int VEC, bool FROM_TABLE>
__global__ void piece_sum_kernel(const W* __restrict__ src, const int64_t* __restrict__ index,
                                 const int64_t* __restrict__ bounds, float* __restrict__ partial,
                                 const T* __restrict__ reserved, const int32_t* __restrict__ slot_map,
                                 const T* __restrict__ scaler, int64_t vocab, int64_t dim) {
  const int64_t p = blockIdx.x;
  const int64_t start = bounds[p], end = bounds[p + 1];
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < dim; c += static_cast<int64_t>(blockDim.x) * VEC) {
    float acc[VEC] = {};
    for (int64_t j = start; j < end; ++j) {
      const int64_t i = index[j];
      float v[VEC];
      if constexpr (FROM_TABLE) {
        load_row<T, W, VEC>(v, i, i >= 0 && i < vocab, c, dim, src, reserved, slot_map, scaler);
      } else {
        const auto g = *reinterpret_cast<const Vec<W, VEC>*>(src + i * dim + c);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = static_cast<float>(g.v[k]);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += v[k];
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) partial[p * dim + c + k] = acc[k];
  }
}

// out[k, :] = sum of partial[piece_offsets[k] : piece_offsets[k+1]] in piece order, then / count (mean) or * scale.
__global__ void segment_reduce_kernel(const float* __restrict__ partial, const int64_t* __restrict__ piece_offsets,
                                      const int64_t* __restrict__ offsets, float* __restrict__ out, int64_t dim,
                                      float scale, bool mean) {
  const int64_t k = blockIdx.x;
  const int64_t first = piece_offsets[k], last = piece_offsets[k + 1];
  const float count = static_cast<float>(offsets[k + 1] - offsets[k]);
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    float acc = 0.f;
    for (int64_t p = first; p < last; ++p) acc += partial[p * dim + c];
    out[k * dim + c] = mean ? acc / count : acc * scale;
  }
}

void check_table(const at::Tensor& weight, const at::Tensor& reserved, const at::Tensor& slot_map,
                 const std::optional<at::Tensor>& scaler) {
  CHECK_INPUT(weight);
  CHECK_INPUT(reserved);
  CHECK_INPUT(slot_map);
  CHECK_SAME_DEVICE(weight, reserved);
  CHECK_SAME_DEVICE(weight, slot_map);
  TORCH_CHECK(weight.dim() == 2 && reserved.dim() == 2 && reserved.size(1) == weight.size(1),
              "reserved_weight must be (K, ", weight.size(1), ")");
  TORCH_CHECK(slot_map.scalar_type() == at::kInt && slot_map.numel() == weight.size(0),
              "slot_map must be an int32 (", weight.size(0), ",) vector");
  if (scaler.has_value()) {
    CHECK_INPUT(*scaler);
    CHECK_SAME_DEVICE(weight, *scaler);
    TORCH_CHECK(weight.scalar_type() == at::kChar, "weight_scaler is for an int8 table, but weight is ",
                weight.scalar_type());
    TORCH_CHECK(scaler->scalar_type() == reserved.scalar_type() && scaler->numel() == weight.size(0),
                "weight_scaler must be a (", weight.size(0), ",) vector of reserved_weight's dtype");
  } else {
    TORCH_CHECK(weight.scalar_type() == reserved.scalar_type(), "weight (", weight.scalar_type(),
                ") and reserved_weight (", reserved.scalar_type(), ") must share a dtype");
  }
}

// Calls fn.template operator()<VEC>() with VEC in {8, 4, 2, 1}, the widest that `vec` allows.
template <int MAX_VEC, typename F>
void with_vec(int vec, F&& fn) {
  if constexpr (MAX_VEC >= 8) { if (vec >= 8) return fn(std::integral_constant<int, 8>{}); }
  if constexpr (MAX_VEC >= 4) { if (vec >= 4) return fn(std::integral_constant<int, 4>{}); }
  if constexpr (MAX_VEC >= 2) { if (vec >= 2) return fn(std::integral_constant<int, 2>{}); }
  fn(std::integral_constant<int, 1>{});
}

#define DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

at::Tensor gather(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& reserved,
                  const at::Tensor& slot_map, const std::optional<at::Tensor>& scaler, double scale) {
  CHECK_INPUT(ids);
  CHECK_INDEX(ids);
  CHECK_SAME_DEVICE(ids, weight);
  check_table(weight, reserved, slot_map, scaler);
  const at::cuda::CUDAGuard guard(weight.device());
  const int64_t n = ids.numel(), vocab = weight.size(0), dim = weight.size(1);
  auto out = at::empty({n, dim}, reserved.options());
  // A K = 0 table still needs a real pointer of its dtype; nothing reads it.
  const at::Tensor res = reserved.size(0) > 0 ? reserved : at::zeros({1, dim}, reserved.options());
  if (n > 0 && dim > 0) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    DISPATCH_FLOAT(reserved.scalar_type(), "reserved_kernels::gather", [&] {
      using T = scalar_t;
      const float s = static_cast<float>(static_cast<T>(static_cast<float>(scale)));  // rounded to T
      const bool int8 = scaler.has_value();
      const T* scaler_ptr = int8 ? scaler->data_ptr<T>() : nullptr;
      const int elem_min = int8 ? 1 : static_cast<int>(sizeof(T));
      const int vec = vec_width<T>(dim, {weight.data_ptr(), res.data_ptr(), out.data_ptr()}, elem_min);
      AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "reserved_kernels::gather_ids", [&] {
        with_vec<16 / sizeof(T)>(vec, [&](auto v) {
          constexpr int VEC = decltype(v)::value;
          const Launch l = launch_for((dim + VEC - 1) / VEC);
          const dim3 grid((n + l.rows_per_block - 1) / l.rows_per_block);
          if (int8) {
            gather_kernel<T, int8_t, index_t, VEC><<<grid, l.block, 0, stream>>>(
                ids.data_ptr<index_t>(), weight.data_ptr<int8_t>(), res.data_ptr<T>(), slot_map.data_ptr<int32_t>(),
                scaler_ptr, out.data_ptr<T>(), n, vocab, dim, s, s != 1.f);
          } else {
            gather_kernel<T, T, index_t, VEC><<<grid, l.block, 0, stream>>>(
                ids.data_ptr<index_t>(), weight.data_ptr<T>(), res.data_ptr<T>(), slot_map.data_ptr<int32_t>(),
                nullptr, out.data_ptr<T>(), n, vocab, dim, s, s != 1.f);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(dim);
  return out.view(shape);
}

at::Tensor scatter_atomic(const at::Tensor& grad, const at::Tensor& ids, const at::Tensor& slot_map, int64_t num_slots,
                          double scale) {
  CHECK_INPUT(grad);
  CHECK_INPUT(ids);
  CHECK_INPUT(slot_map);
  CHECK_INDEX(ids);
  CHECK_SAME_DEVICE(grad, ids);
  CHECK_SAME_DEVICE(grad, slot_map);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == ids.numel(), "grad_out must have shape ids.shape + (D,)");
  const at::cuda::CUDAGuard guard(grad.device());
  const int64_t n = ids.numel(), dim = grad.size(1);
  auto out = at::zeros({num_slots, dim}, grad.options().dtype(at::kFloat));
  if (n == 0 || dim == 0 || num_slots == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  DISPATCH_FLOAT(grad.scalar_type(), "reserved_kernels::scatter_atomic", [&] {
    using T = scalar_t;
    const int vec = vec_width<T>(dim, {grad.data_ptr()}, sizeof(T));
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "reserved_kernels::scatter_ids", [&] {
      with_vec<16 / sizeof(T)>(vec, [&](auto v) {
        constexpr int VEC = decltype(v)::value;
        const Launch l = launch_for((dim + VEC - 1) / VEC);
        const dim3 grid((n + l.rows_per_block - 1) / l.rows_per_block);
        scatter_atomic_kernel<T, index_t, VEC><<<grid, l.block, 0, stream>>>(
            grad.data_ptr<T>(), ids.data_ptr<index_t>(), slot_map.data_ptr<int32_t>(), out.data_ptr<float>(), n,
            slot_map.numel(), dim, static_cast<float>(scale));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

at::Tensor piece_sum(const at::Tensor& src, const at::Tensor& index, const at::Tensor& bounds,
                     const std::optional<at::Tensor>& reserved, const std::optional<at::Tensor>& slot_map,
                     const std::optional<at::Tensor>& scaler) {
  CHECK_INPUT(src);
  CHECK_INPUT(index);
  CHECK_INPUT(bounds);
  CHECK_SAME_DEVICE(src, index);
  CHECK_SAME_DEVICE(src, bounds);
  TORCH_CHECK(index.scalar_type() == at::kLong && bounds.scalar_type() == at::kLong, "index and bounds must be int64");
  const bool from_table = reserved.has_value();
  TORCH_CHECK(from_table == slot_map.has_value(), "reserved_weight and slot_map come together");
  if (from_table) check_table(src, *reserved, *slot_map, scaler);
  const at::cuda::CUDAGuard guard(src.device());
  const int64_t pieces = bounds.numel() - 1, dim = src.size(1), vocab = src.size(0);
  auto partial = at::empty({pieces, dim}, src.options().dtype(at::kFloat));
  if (pieces <= 0 || dim == 0) return partial;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto float_type = from_table ? reserved->scalar_type() : src.scalar_type();
  DISPATCH_FLOAT(float_type, "reserved_kernels::piece_sum", [&] {
    using T = scalar_t;
    // int8 rows are read as 1-byte vectors of VEC; keep their width modest.
    const bool int8 = from_table && scaler.has_value();
    const at::Tensor res = from_table && reserved->size(0) == 0 ? at::zeros({1, dim}, reserved->options())
                                                                : (from_table ? *reserved : src);
    const int vec = vec_width<T>(dim, {src.data_ptr(), res.data_ptr()}, int8 ? 1 : sizeof(T));
    with_vec<16 / sizeof(T)>(vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      const Launch l = launch_for((dim + VEC - 1) / VEC);
      const dim3 block(l.block.x);
      if (!from_table) {
        piece_sum_kernel<T, T, VEC, false><<<pieces, block, 0, stream>>>(
            src.data_ptr<T>(), index.data_ptr<int64_t>(), bounds.data_ptr<int64_t>(), partial.data_ptr<float>(),
            nullptr, nullptr, nullptr, vocab, dim);
      } else if (int8) {
        piece_sum_kernel<T, int8_t, VEC, true><<<pieces, block, 0, stream>>>(
            src.data_ptr<int8_t>(), index.data_ptr<int64_t>(), bounds.data_ptr<int64_t>(), partial.data_ptr<float>(),
            res.data_ptr<T>(), slot_map->data_ptr<int32_t>(), scaler->data_ptr<T>(), vocab, dim);
      } else {
        piece_sum_kernel<T, T, VEC, true><<<pieces, block, 0, stream>>>(
            src.data_ptr<T>(), index.data_ptr<int64_t>(), bounds.data_ptr<int64_t>(), partial.data_ptr<float>(),
            res.data_ptr<T>(), slot_map->data_ptr<int32_t>(), nullptr, vocab, dim);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return partial;
}

at::Tensor segment_reduce(const at::Tensor& partial, const at::Tensor& piece_offsets, const at::Tensor& offsets,
                          double scale, bool mean) {
  CHECK_INPUT(partial);
  CHECK_INPUT(piece_offsets);
  CHECK_INPUT(offsets);
  TORCH_CHECK(partial.scalar_type() == at::kFloat, "partial must be float32");
  TORCH_CHECK(piece_offsets.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong &&
                  piece_offsets.numel() == offsets.numel(),
              "piece_offsets and offsets must be int64 vectors of one length");
  const at::cuda::CUDAGuard guard(partial.device());
  const int64_t segments = offsets.numel() - 1, dim = partial.size(1);
  auto out = at::empty({segments, dim}, partial.options());
  if (segments <= 0 || dim == 0) return out.zero_();
  const int threads = launch_for(dim).block.x;
  segment_reduce_kernel<<<segments, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      partial.data_ptr<float>(), piece_offsets.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
      out.data_ptr<float>(), dim, static_cast<float>(scale), mean);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reserved_kernels, m) {
  m.def("cuda_gather(Tensor ids, Tensor weight, Tensor reserved_weight, Tensor slot_map, Tensor? weight_scaler, "
        "float scale) -> Tensor");
  m.def("cuda_scatter_atomic(Tensor grad, Tensor ids, Tensor slot_map, int num_slots, float scale) -> Tensor");
  m.def("cuda_piece_sum(Tensor src, Tensor index, Tensor bounds, Tensor? reserved_weight, Tensor? slot_map, "
        "Tensor? weight_scaler) -> Tensor");
  m.def("cuda_segment_reduce(Tensor partial, Tensor piece_offsets, Tensor offsets, float scale, bool mean) -> Tensor");
}

TORCH_LIBRARY_IMPL(reserved_kernels, CUDA, m) {
  m.impl("cuda_gather", &gather);
  m.impl("cuda_scatter_atomic", &scatter_atomic);
  m.impl("cuda_piece_sum", &piece_sum);
  m.impl("cuda_segment_reduce", &segment_reduce);
}

}  // namespace reserved_kernels
