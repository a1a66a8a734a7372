// CUDA kernels of the three public ops, registered on the CUDA dispatch key (no pybind11, no Python on the path).
//
// row(i) = reserved[slot_map[i]] rounded to the table dtype T when slot_map[i] >= 0, else weight[i] (times
// scaler[i], rounded to T, for an int8 table). All offsets are int64; threads walk a row's columns in
// 16-byte vectors where alignment allows. No host function here reads device memory: every grid is sized
// from shapes the host already knows, so nothing synchronises the stream.
//
// gather validates ids on the device: an id outside [0, V) prints its value and the range, then fails a
// device-side assertion (as F.embedding does). The backward never re-validates: an out-of-range id is
// simply not a hit.
//
// scatter_grad is deterministic and skew-proof in three launches:
//   1. count:  per tile of tokens, how many hit each slot (integer atomics: the counts do not depend on order);
//   2. place:  each hit's position in the order (slot, token): offsets of lower slots + this slot's hits in
//              earlier tiles + earlier hits in this tile. Rounds of 256 tokens rank equal slots with warp
//              matching, so one slot hit by every token costs the same as distinct slots;
//   3. sum:    fixed chunks of that order, one block per chunk and column block. A run of one slot inside a
//              chunk is summed in order and written straight to the output dtype; a run that crosses chunk
//              boundaries (a hot slot) leaves one fp32 partial per chunk, and the last chunk to finish adds
//              the partials in chunk order. Every order is fixed by the input, so results are bitwise
//              repeatable, and a hot slot spreads over N / chunk blocks instead of serialising.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "common.h"

namespace reserved_kernels {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kPlanThreads = 256;
constexpr int kPlanWarps = kPlanThreads / 32;
constexpr int kSumThreads = 128;
constexpr int64_t kMaxTiles = 32;
constexpr int64_t kMinTileTokens = 2048;
constexpr int64_t kMinChunk = 128;
constexpr int64_t kMaxChunks = 1024;
constexpr int64_t kZeroSlots = 8;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename A, typename T, int VEC>
__device__ __forceinline__ void load_vec(A (&out)[VEC], const T* __restrict__ p) {
  const auto v = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<A>(v.v[i]);
}

template <typename T, typename A, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const A (&in)[VEC]) {
  Vec<T, VEC> v;
#pragma unroll
  for (int i = 0; i < VEC; ++i) v.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

// VEC values of row(id) from column c, as the acc type A of T.
template <typename T, typename W, typename R, int VEC, typename A>
__device__ __forceinline__ void load_row(A (&out)[VEC], int64_t id, int32_t slot, int64_t c, int64_t dim,
                                         const W* __restrict__ weight, const R* __restrict__ reserved,
                                         const T* __restrict__ scaler) {
  if (slot >= 0) {
    R r[VEC];
    load_vec<R, R, VEC>(r, reserved + static_cast<int64_t>(slot) * dim + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = static_cast<A>(static_cast<T>(r[i]));  // master row rounded to T
  } else if constexpr (std::is_same_v<W, int8_t>) {
    const A s = static_cast<A>(scaler[id]);
    A w[VEC];
    load_vec<A, int8_t, VEC>(w, weight + id * dim + c);
    // gemma_pytorch dequantises to T before anything else: one rounding of the exact product.
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = static_cast<A>(static_cast<T>(w[i] * s));
  } else {
    load_vec<A, W, VEC>(out, weight + id * dim + c);
  }
}

// ------------------------------------------------------------------------------------------------ gather

// out[n, :] = cast(scale * row(ids[n])). The product of two values of T is exact in A, so the one rounding
// here (round to nearest even) matches PyTorch's `embedding(...) * tensor(scale, dtype)` bit for bit.
template <typename T, typename W, typename R, typename I, int VEC>
__global__ void gather_kernel(const I* __restrict__ ids, const W* __restrict__ weight, const R* __restrict__ reserved,
                              const int32_t* __restrict__ slot_map, const T* __restrict__ scaler, T* __restrict__ out,
                              int64_t n, int64_t vocab, int64_t num_slots, int64_t dim, at::opmath_type<T> scale,
                              bool apply_scale) {
  using A = at::opmath_type<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= n) return;
  const int64_t id = static_cast<int64_t>(ids[row]);
  if (!(id >= 0 && id < vocab)) {
    if (threadIdx.x == 0) {
      printf("reserved_kernels::gather: ids must lie in [0, %lld), got %lld (token %lld)\n",
             static_cast<long long>(vocab), static_cast<long long>(id), static_cast<long long>(row));
    }
    CUDA_KERNEL_ASSERT(id >= 0 && id < vocab && "ids must lie in [0, num_embeddings)");
    return;
  }
  const int32_t slot = slot_map[id];
  if (!(slot < num_slots)) {
    if (threadIdx.x == 0) {
      printf("reserved_kernels::gather: slot_map[%lld] = %d is not a row of reserved_weight (K=%lld)\n",
             static_cast<long long>(id), slot, static_cast<long long>(num_slots));
    }
    CUDA_KERNEL_ASSERT(slot < num_slots && "slot_map entries must be -1 or a row of reserved_weight");
    return;
  }
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < dim; c += static_cast<int64_t>(blockDim.x) * VEC) {
    A v[VEC];
    load_row<T, W, R, VEC>(v, id, slot, c, dim, weight, reserved, scaler);
    if (apply_scale) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] *= scale;
    }
    store_vec<T, A, VEC>(out + row * dim + c, v);
  }
}

// Threads per row (x) and rows per block (y) for `columns` vectors per row: at most 256 threads per block.
dim3 row_block(int64_t columns) {
  int tx = 32;
  while (tx < 256 && tx < columns) tx *= 2;
  return dim3(tx, 256 / tx);
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Calls fn(W{}, R{}) with the table's element type W (T or int8) and the reserved rows' R (T or float).
template <typename T, typename F>
void with_table_types(const at::Tensor& reserved, bool int8, F&& fn) {
  auto with_reserved = [&](auto w) {
    if (reserved.scalar_type() == at::kFloat && !std::is_same_v<T, float>) {
      fn(w, float{});
    } else {
      fn(w, T{});
    }
  };
  if (int8) {
    with_reserved(int8_t{});
  } else {
    with_reserved(T{});
  }
}

// Calls fn(std::integral_constant<int, VEC>) with VEC = MAX when `wide`, else 1 (odd widths, unaligned views).
template <int MAX, typename F>
void with_vec(bool wide, F&& fn) {
  if (wide) {
    fn(std::integral_constant<int, MAX>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

at::Tensor gather_cuda(const at::Tensor& ids_in, const at::Tensor& weight, const at::Tensor& reserved,
                       const at::Tensor& slot_map, const std::optional<at::Tensor>& scaler, double scale) {
  check_gather(ids_in, weight, reserved, slot_map, scaler);
  const at::cuda::CUDAGuard guard(weight.device());
  const at::Tensor ids = ids_in.contiguous();
  const int64_t n = ids.numel(), vocab = weight.size(0), dim = weight.size(1), num_slots = reserved.size(0);
  const auto dtype = table_dtype(weight, scaler);
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(dim);
  at::Tensor out = at::empty(shape, weight.options().dtype(dtype));
  if (n == 0 || dim == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool int8 = scaler.has_value();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "reserved_kernels::gather", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    constexpr int MAX_VEC = 16 / sizeof(T);
    const A s = static_cast<A>(rounded_scale<T>(scale));
    const bool wide = dim % MAX_VEC == 0 && aligned(weight.data_ptr(), (int8 ? 1 : sizeof(T)) * MAX_VEC) &&
                      aligned(reserved.data_ptr(), reserved.element_size() * MAX_VEC) &&
                      aligned(out.data_ptr(), sizeof(T) * MAX_VEC);
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "reserved_kernels::gather_ids", [&] {
      with_table_types<T>(reserved, int8, [&](auto w_tag, auto r_tag) {
        using W = decltype(w_tag);
        using R = decltype(r_tag);
        with_vec<MAX_VEC>(wide, [&](auto v) {
          constexpr int VEC = decltype(v)::value;
          const dim3 block = row_block(cdiv(dim, VEC));
          const dim3 grid(cdiv(n, block.y));
          gather_kernel<T, W, R, index_t, VEC><<<grid, block, 0, stream>>>(
              ids.data_ptr<index_t>(), static_cast<const W*>(weight.data_ptr()),
              static_cast<const R*>(reserved.data_ptr()), slot_map.data_ptr<int32_t>(),
              int8 ? scaler->data_ptr<T>() : nullptr, out.data_ptr<T>(), n, vocab, num_slots, dim, s, s != A(1));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------ scatter_grad

// The slot token i hits, or -1 (past the tile, an id outside [0, V), a non-reserved id, a bad slot).
template <typename I>
__device__ __forceinline__ int32_t hit_slot(const I* __restrict__ ids, const int32_t* __restrict__ slot_map, int64_t i,
                                            int64_t end, int64_t vocab, int64_t num_slots) {
  if (i >= end) return -1;
  const int64_t id = static_cast<int64_t>(ids[i]);
  if (id < 0 || id >= vocab) return -1;
  const int32_t s = slot_map[id];
  return s >= 0 && s < num_slots ? s : -1;
}

// counts[tile, s] = number of tokens of this tile that hit slot s.
template <typename I>
__global__ void __launch_bounds__(kPlanThreads)
    count_kernel(const I* __restrict__ ids, const int32_t* __restrict__ slot_map, int32_t* __restrict__ counts,
                 int64_t n, int64_t vocab, int64_t num_slots, int64_t tile_tokens) {
  const int64_t tile = blockIdx.x;
  int32_t* row = counts + tile * num_slots;
  for (int64_t s = threadIdx.x; s < num_slots; s += kPlanThreads) row[s] = 0;
  __syncthreads();
  const int64_t start = tile * tile_tokens, end = start + tile_tokens < n ? start + tile_tokens : n;
  const unsigned lane = threadIdx.x % 32;
  for (int64_t r = start; r < end; r += kPlanThreads) {
    const int32_t s = hit_slot(ids, slot_map, r + threadIdx.x, end, vocab, num_slots);
    // One atomic per distinct slot in the warp: a slot hit by every token does not serialise.
    const unsigned peers = __match_any_sync(kFullMask, s);
    if (s >= 0 && lane == static_cast<unsigned>(__ffs(peers) - 1)) atomicAdd(row + s, __popc(peers));
  }
}

// Exclusive prefix sum of one value per thread over the block; *total receives the block's sum.
__device__ int32_t block_exclusive_scan(int32_t x, int32_t* total) {
  __shared__ int32_t warp_sums[kPlanWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int32_t inclusive = x;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int32_t y = __shfl_up_sync(kFullMask, inclusive, d);
    if (lane >= d) inclusive += y;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  int32_t before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kPlanWarps; ++w) {
    before += w < warp ? warp_sums[w] : 0;
    sum += warp_sums[w];
  }
  __syncthreads();  // warp_sums is reused by the next call
  *total = sum;
  return before + inclusive - x;
}

// Writes each hit's (token, slot) at its position in the (slot, token) order; offsets[s] = first position of
// slot s (offsets[K] = number of hits); zeroes the sum kernel's arrival counters.
template <typename I>
__global__ void __launch_bounds__(kPlanThreads)
    place_kernel(const I* __restrict__ ids, const int32_t* __restrict__ slot_map, const int32_t* __restrict__ counts,
                 int32_t* __restrict__ bases, int32_t* __restrict__ offsets, int32_t* __restrict__ arrivals,
                 int64_t num_arrivals, int32_t* __restrict__ sorted_token, int32_t* __restrict__ sorted_slot, int64_t n,
                 int64_t vocab, int64_t num_slots, int64_t tile_tokens, int64_t num_tiles) {
  const int64_t tile = blockIdx.x;
  int32_t* base = bases + tile * num_slots;
  // 1. Where this tile's hits of slot s begin: all hits of lower slots, plus slot s's hits in earlier tiles.
  int32_t carry = 0;
  for (int64_t s0 = 0; s0 < num_slots; s0 += kPlanThreads) {
    const int64_t s = s0 + threadIdx.x;
    int32_t total = 0, before = 0;
    if (s < num_slots) {
      for (int64_t t = 0; t < num_tiles; ++t) {
        const int32_t c = counts[t * num_slots + s];
        total += c;
        before += t < tile ? c : 0;
      }
    }
    int32_t chunk_total;
    const int32_t lower = block_exclusive_scan(total, &chunk_total);
    if (s < num_slots) {
      base[s] = carry + lower + before;
      if (tile == 0) offsets[s] = carry + lower;
    }
    carry += chunk_total;
  }
  if (tile == 0 && threadIdx.x == 0) offsets[num_slots] = carry;
  for (int64_t j = tile * kPlanThreads + threadIdx.x; j < num_arrivals; j += num_tiles * kPlanThreads) arrivals[j] = 0;
  __syncthreads();

  // 2. Round by round in token order: a hit's rank is the number of earlier hits of its slot in the round.
  __shared__ int32_t lead_slot[kPlanWarps][32], lead_count[kPlanWarps][32], num_leads[kPlanWarps];
  const int64_t start = tile * tile_tokens, end = start + tile_tokens < n ? start + tile_tokens : n;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned below = (1u << lane) - 1u;
  for (int64_t r = start; r < end; r += kPlanThreads) {
    const int64_t i = r + threadIdx.x;
    const int32_t s = hit_slot(ids, slot_map, i, end, vocab, num_slots);
    if (!__syncthreads_or(s >= 0)) continue;  // most rounds hit nothing
    const unsigned peers = __match_any_sync(kFullMask, s);
    const int rank = __popc(peers & below), count = __popc(peers);
    const bool leads = s >= 0 && rank == 0;
    const unsigned leaders = __ballot_sync(kFullMask, leads);
    if (leads) {
      const int j = __popc(leaders & below);
      lead_slot[warp][j] = s;
      lead_count[warp][j] = count;
    }
    if (lane == 0) num_leads[warp] = __popc(leaders);
    __syncthreads();
    bool last = false;
    int32_t next = 0;
    if (s >= 0) {
      int32_t prior = 0;
      bool later = false;
      for (int w = 0; w < kPlanWarps; ++w) {
        if (w == warp) continue;
        for (int j = 0; j < num_leads[w]; ++j) {
          if (lead_slot[w][j] == s) {
            prior += w < warp ? lead_count[w][j] : 0;
            later = later || w > warp;
          }
        }
      }
      const int32_t pos = base[s] + prior + rank;
      sorted_token[pos] = static_cast<int32_t>(i);
      sorted_slot[pos] = s;
      last = !later && rank == count - 1;
      next = pos + 1;
    }
    __syncthreads();  // every thread has read base[s] before the round's last hit of s moves it on
    if (last) base[s] = next;
  }
}

// out[s, cols] = cast(scale * Σ grad[token, cols]) over slot s's hits in (slot, token) order; see the file header.
template <typename T, typename O, int VEC>
__global__ void __launch_bounds__(kSumThreads)
    sum_kernel(const T* __restrict__ grad, const int32_t* __restrict__ sorted_token,
               const int32_t* __restrict__ sorted_slot, const int32_t* __restrict__ offsets, int32_t* arrivals,
               at::opmath_type<T>* pieces, O* __restrict__ out, int64_t num_slots, int64_t dim, int64_t chunk,
               int64_t num_chunks, at::opmath_type<T> scale) {
  using A = at::opmath_type<T>;
  const int64_t c = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kSumThreads * VEC + static_cast<int64_t>(threadIdx.x) * VEC;
  const bool active = col < dim;
  if (c >= num_chunks) {  // the rows of slots that no token hit
    const A zero[VEC] = {};
    const int64_t first = (c - num_chunks) * kZeroSlots;
    for (int64_t s = first; s < first + kZeroSlots && s < num_slots; ++s) {
      if (active && offsets[s + 1] == offsets[s]) store_vec<O, A, VEC>(out + s * dim + col, zero);
    }
    return;
  }
  const int64_t hits = offsets[num_slots];
  const int64_t lo = c * chunk;
  if (lo >= hits) return;
  const int64_t hi = lo + chunk < hits ? lo + chunk : hits;
  __shared__ bool last_arrival;
  for (int64_t p = lo; p < hi;) {
    const int32_t s = sorted_slot[p];
    const int64_t run_lo = offsets[s], run_hi = offsets[s + 1];
    const int64_t e = run_hi < hi ? run_hi : hi;
    A acc[VEC] = {};
    if (active) {
#pragma unroll 4
      for (int64_t q = p; q < e; ++q) {
        A g[VEC];
        load_vec<A, T, VEC>(g, grad + static_cast<int64_t>(sorted_token[q]) * dim + col);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += g[i];
      }
    }
    if (run_lo >= lo && run_hi <= hi) {
      if (active) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] *= scale;
        store_vec<O, A, VEC>(out + s * dim + col, acc);
      }
    } else {
      // In this chunk the run is either the first (it began earlier) or the last (it goes on): piece 0 or 1.
      const int which = run_lo < lo ? 0 : 1;
      if (active) store_vec<A, A, VEC>(pieces + (c * 2 + which) * dim + col, acc);
      __threadfence();
      __syncthreads();
      const int64_t c0 = run_lo / chunk, c1 = (run_hi - 1) / chunk;
      if (threadIdx.x == 0) {
        last_arrival = atomicAdd(arrivals + s * gridDim.y + blockIdx.y, 1) == c1 - c0;
      }
      __syncthreads();
      if (last_arrival) {
        __threadfence();
        if (active) {
          A total[VEC] = {};
          for (int64_t cc = c0; cc <= c1; ++cc) {  // chunk order: the same sum whichever block arrives last
            const A* part = pieces + (cc * 2 + (cc == c0 ? 1 : 0)) * dim + col;
#pragma unroll
            for (int i = 0; i < VEC; ++i) total[i] += __ldcg(part + i);
          }
#pragma unroll
          for (int i = 0; i < VEC; ++i) total[i] *= scale;
          store_vec<O, A, VEC>(out + s * dim + col, total);
        }
      }
    }
    p = e;
  }
}

at::Tensor scatter_grad_cuda(const at::Tensor& grad_out, const at::Tensor& ids_in, const at::Tensor& slot_map,
                             int64_t num_slots, double scale, at::ScalarType out_dtype) {
  check_scatter(grad_out, ids_in, slot_map, num_slots, out_dtype);
  const auto grad_dtype = grad_out.scalar_type();
  TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == grad_dtype,
                   "out_dtype must be float32 or grad_out's dtype (", grad_dtype, "), got ", out_dtype);
  const at::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor ids = ids_in.contiguous();
  const int64_t n = ids.numel(), dim = grad_out.size(-1), vocab = slot_map.size(0);
  const at::Tensor grad = grad_out.contiguous();
  at::Tensor out = at::empty({num_slots, dim}, grad.options().dtype(out_dtype));
  if (num_slots == 0 || dim == 0) return out;
  if (n == 0) return out.zero_();
  // Grids from sizes alone: tiles of whole rounds for the plan, fixed chunks of the sorted order for the sums.
  const int64_t num_tiles_max = std::min(kMaxTiles, cdiv(n, kMinTileTokens));
  const int64_t tile_tokens = cdiv(cdiv(n, num_tiles_max), kPlanThreads) * kPlanThreads;
  const int64_t num_tiles = cdiv(n, tile_tokens);
  const int64_t chunk = std::max(kMinChunk, cdiv(n, kMaxChunks));
  const int64_t num_chunks = cdiv(n, chunk);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_dtype, "reserved_kernels::scatter_grad", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    constexpr int MAX_VEC = 16 / sizeof(T);
    const bool wide = dim % MAX_VEC == 0 && aligned(grad.data_ptr(), sizeof(T) * MAX_VEC) &&
                      aligned(out.data_ptr(), out.element_size() * MAX_VEC);
    const int64_t vec = wide ? MAX_VEC : 1;
    const int64_t col_blocks = cdiv(dim, kSumThreads * vec);
    const int64_t num_arrivals = num_slots * col_blocks;
    // One int32 workspace: counts and bases (tiles x K), offsets (K + 1), arrival counters, the sorted order.
    at::Tensor work = at::empty({2 * num_tiles * num_slots + num_slots + 1 + num_arrivals + 2 * n},
                                ids.options().dtype(at::kInt));
    int32_t* counts = work.data_ptr<int32_t>();
    int32_t* bases = counts + num_tiles * num_slots;
    int32_t* offsets = bases + num_tiles * num_slots;
    int32_t* arrivals = offsets + num_slots + 1;
    int32_t* sorted_token = arrivals + num_arrivals;
    int32_t* sorted_slot = sorted_token + n;
    at::Tensor pieces = at::empty({num_chunks * 2 * dim}, grad.options().dtype(sum_dtype(grad_dtype)));
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "reserved_kernels::scatter_grad_ids", [&] {
      count_kernel<index_t><<<num_tiles, kPlanThreads, 0, stream>>>(ids.data_ptr<index_t>(), slot_map.data_ptr<int32_t>(),
                                                                   counts, n, vocab, num_slots, tile_tokens);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      place_kernel<index_t><<<num_tiles, kPlanThreads, 0, stream>>>(
          ids.data_ptr<index_t>(), slot_map.data_ptr<int32_t>(), counts, bases, offsets, arrivals, num_arrivals,
          sorted_token, sorted_slot, n, vocab, num_slots, tile_tokens, num_tiles);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const dim3 grid(num_chunks + cdiv(num_slots, kZeroSlots), col_blocks);
    const A s = static_cast<A>(scale);
    auto launch_sum = [&](auto o_tag) {
      using O = decltype(o_tag);
      with_vec<MAX_VEC>(wide, [&](auto v) {
        constexpr int VEC = decltype(v)::value;
        sum_kernel<T, O, VEC><<<grid, kSumThreads, 0, stream>>>(grad.data_ptr<T>(), sorted_token, sorted_slot, offsets,
                                                                arrivals, pieces.data_ptr<A>(), out.data_ptr<O>(),
                                                                num_slots, dim, chunk, num_chunks, s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (out_dtype == at::kFloat) {
      launch_sum(float{});
    } else {
      launch_sum(T{});
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------ segment_mean

// out[k, cols] = mean of row(src[j]) for j in [offsets[k], offsets[k+1]), summed in order in A.
template <typename T, typename W, typename R, typename I, int VEC>
__global__ void segment_mean_kernel(const W* __restrict__ weight, const R* __restrict__ reserved,
                                    const int32_t* __restrict__ slot_map, const T* __restrict__ scaler,
                                    const int64_t* __restrict__ offsets, const I* __restrict__ src,
                                    at::opmath_type<T>* __restrict__ out, int64_t num_ids, int64_t vocab,
                                    int64_t num_slots, int64_t dim) {
  using A = at::opmath_type<T>;
  const int64_t k = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x * VEC + static_cast<int64_t>(threadIdx.x) * VEC;
  const int64_t lo = offsets[k], hi = offsets[k + 1];
  if (!(lo >= 0 && lo < hi && hi <= num_ids)) {
    if (threadIdx.x == 0) {
      printf("reserved_kernels::segment_mean: destination %lld has sources [%lld, %lld) of %lld\n",
             static_cast<long long>(k), static_cast<long long>(lo), static_cast<long long>(hi),
             static_cast<long long>(num_ids));
    }
    CUDA_KERNEL_ASSERT(lo >= 0 && lo < hi && hi <= num_ids && "every destination needs at least one source id");
    return;
  }
  if (col >= dim) return;
  A acc[VEC] = {};
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t id = static_cast<int64_t>(src[j]);
    const int32_t slot = id >= 0 && id < vocab ? slot_map[id] : -1;
    if (!(id >= 0 && id < vocab && slot < num_slots)) {
      printf("reserved_kernels::segment_mean: src_ids must lie in [0, %lld) with a valid slot, got %lld\n",
             static_cast<long long>(vocab), static_cast<long long>(id));
      CUDA_KERNEL_ASSERT(id >= 0 && id < vocab && slot < num_slots && "src_ids must lie in [0, num_embeddings)");
      return;
    }
    A v[VEC];
    load_row<T, W, R, VEC>(v, id, slot, col, dim, weight, reserved, scaler);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += v[i];
  }
  const A count = static_cast<A>(hi - lo);
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] /= count;
  store_vec<A, A, VEC>(out + k * dim + col, acc);
}

at::Tensor segment_mean_cuda(const at::Tensor& weight, const at::Tensor& reserved, const at::Tensor& slot_map,
                             const std::optional<at::Tensor>& scaler, const at::Tensor& offsets_in,
                             const at::Tensor& src_in) {
  check_segment_mean(weight, reserved, slot_map, scaler, offsets_in, src_in);
  const at::cuda::CUDAGuard guard(weight.device());
  const at::Tensor offsets = offsets_in.contiguous(), src = src_in.contiguous();
  const int64_t num_segments = offsets.size(0) - 1, dim = weight.size(1);
  const auto dtype = table_dtype(weight, scaler);
  at::Tensor out = at::empty({num_segments, dim}, weight.options().dtype(sum_dtype(dtype)));
  if (num_segments == 0 || dim == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool int8 = scaler.has_value();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "reserved_kernels::segment_mean", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    constexpr int MAX_VEC = 16 / sizeof(T);
    const bool wide = dim % MAX_VEC == 0 && aligned(weight.data_ptr(), (int8 ? 1 : sizeof(T)) * MAX_VEC) &&
                      aligned(reserved.data_ptr(), reserved.element_size() * MAX_VEC) &&
                      aligned(out.data_ptr(), sizeof(A) * MAX_VEC);
    AT_DISPATCH_INDEX_TYPES(src.scalar_type(), "reserved_kernels::segment_mean_ids", [&] {
      with_table_types<T>(reserved, int8, [&](auto w_tag, auto r_tag) {
        using W = decltype(w_tag);
        using R = decltype(r_tag);
        with_vec<MAX_VEC>(wide, [&](auto v) {
          constexpr int VEC = decltype(v)::value;
          const int64_t threads = row_block(cdiv(dim, VEC)).x;
          const dim3 grid(num_segments, cdiv(dim, threads * VEC));
          segment_mean_kernel<T, W, R, index_t, VEC><<<grid, threads, 0, stream>>>(
              static_cast<const W*>(weight.data_ptr()), static_cast<const R*>(reserved.data_ptr()),
              slot_map.data_ptr<int32_t>(), int8 ? scaler->data_ptr<T>() : nullptr, offsets.data_ptr<int64_t>(),
              src.data_ptr<index_t>(), out.data_ptr<A>(), src.size(0), weight.size(0), reserved.size(0), dim);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(reserved_kernels, CUDA, m) {
  m.impl("gather", &gather_cuda);
  m.impl("scatter_grad", &scatter_grad_cuda);
  m.impl("segment_mean", &segment_mean_cuda);
}

}  // namespace reserved_kernels
