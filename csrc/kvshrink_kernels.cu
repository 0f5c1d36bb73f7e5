// CUDA compaction and quantization of paged KV caches: the same operations and
// the same rounding as the Triton kernels in vllm_kvshrink/kernels/ (whose
// PyTorch references define them).  See csrc/README.md.

#include "kvshrink_kernels.h"
#include "kvshrink_quant_math.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace kvshrink {
namespace {

constexpr int kThreads = 256;

// --------------------------------------------------------------------------
// compaction
// --------------------------------------------------------------------------
// Each block owns one (layer, head) and walks tokens in chunks of
// kThreads * PER_THREAD units (a unit is one element, or 16 bytes when rows
// are contiguous and aligned).  A chunk's loads all finish (__syncthreads)
// before its stores; with one block per (layer, head) along y the chunks run
// in ascending order, which makes in-place compaction with ascending sources
// safe: chunk c writes positions below the end of chunk c, every later chunk
// reads positions at or beyond it.
template <typename Unit, typename Index, int PER_THREAD, bool SRC_PAGED, bool DST_PAGED>
__global__ void compact_kernel(CompactArgs a, int64_t units_per_token) {
  const int64_t layer = blockIdx.x / a.n_heads;
  const int64_t head = blockIdx.x % a.n_heads;
  const Index* src_table = static_cast<const Index*>(a.src_table);
  const Index* src_index = static_cast<const Index*>(a.src_index);
  const Index* dst_table = static_cast<const Index*>(a.dst_table);
  Unit* src_k = static_cast<Unit*>(a.src_k) + layer * a.sk.layer + head * a.sk.head;
  Unit* src_v = static_cast<Unit*>(a.src_v) + layer * a.sv.layer + head * a.sv.head;
  Unit* dst_k = static_cast<Unit*>(a.dst_k) + layer * a.dk.layer + head * a.dk.head;
  Unit* dst_v = static_cast<Unit*>(a.dst_v) + layer * a.dv.layer + head * a.dv.head;
  const int64_t chunk_tokens =
      units_per_token >= kThreads * PER_THREAD ? 1 : (kThreads * PER_THREAD) / units_per_token;
  const int64_t chunk_units = chunk_tokens * units_per_token;
  const int64_t step = chunk_tokens * gridDim.y;
  Unit k_reg[PER_THREAD];
  Unit v_reg[PER_THREAD];
  int64_t dk_off[PER_THREAD];
  int64_t dv_off[PER_THREAD];
  for (int64_t start = blockIdx.y * chunk_tokens; start < a.n_keep; start += step) {
    // a token wider than one chunk is done in several passes of the same chunk
    for (int64_t base = 0; base < chunk_units; base += kThreads * PER_THREAD) {
#pragma unroll
      for (int r = 0; r < PER_THREAD; ++r) {
        dk_off[r] = -1;
        const int64_t e = base + threadIdx.x + r * kThreads;
        if (e >= chunk_units) continue;
        const int64_t i = start + e / units_per_token;
        const int64_t d = e % units_per_token;
        if (i >= a.n_keep) continue;
        int64_t sk_tok, sv_tok;
        if (SRC_PAGED) {
          const int64_t s = src_index[layer * a.si_layer + head * a.si_head + i * a.si_keep];
          const int64_t blk = src_table[s / a.block_size];
          const int64_t off = s % a.block_size;
          sk_tok = blk * a.sk.block + off * a.sk.token;
          sv_tok = blk * a.sv.block + off * a.sv.token;
        } else {
          sk_tok = i * a.sk.token;
          sv_tok = i * a.sv.token;
        }
        k_reg[r] = src_k[sk_tok + d * a.sk.dim];
        v_reg[r] = src_v[sv_tok + d * a.sv.dim];
        if (DST_PAGED) {
          const int64_t blk = dst_table[i / a.block_size];
          const int64_t off = i % a.block_size;
          dk_off[r] = blk * a.dk.block + off * a.dk.token + d * a.dk.dim;
          dv_off[r] = blk * a.dv.block + off * a.dv.token + d * a.dv.dim;
        } else {
          dk_off[r] = i * a.dk.token + d * a.dk.dim;
          dv_off[r] = i * a.dv.token + d * a.dv.dim;
        }
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < PER_THREAD; ++r) {
        if (dk_off[r] < 0) continue;
        dst_k[dk_off[r]] = k_reg[r];
        dst_v[dv_off[r]] = v_reg[r];
      }
    }
  }
}

template <typename Unit, typename Index>
cudaError_t launch_compact_typed(const CompactArgs& a, int64_t units_per_token,
                                 cudaStream_t stream) {
  constexpr int kPer = 4;
  const int64_t chunk_tokens =
      units_per_token >= kThreads * kPer ? 1 : (kThreads * kPer) / units_per_token;
  const int64_t chunks = (a.n_keep + chunk_tokens - 1) / chunk_tokens;
  dim3 grid(static_cast<unsigned>(a.n_layers * a.n_heads),
            a.ordered ? 1u : static_cast<unsigned>(chunks < 65535 ? chunks : 65535));
  if (a.src_paged && a.dst_paged) {
    compact_kernel<Unit, Index, kPer, true, true><<<grid, kThreads, 0, stream>>>(a, units_per_token);
  } else if (a.src_paged) {
    compact_kernel<Unit, Index, kPer, true, false><<<grid, kThreads, 0, stream>>>(a, units_per_token);
  } else {
    compact_kernel<Unit, Index, kPer, false, true><<<grid, kThreads, 0, stream>>>(a, units_per_token);
  }
  return cudaGetLastError();
}

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

bool divisible(const KVStrides& s, int64_t units) {
  return s.layer % units == 0 && s.block % units == 0 && s.head % units == 0 &&
         s.token % units == 0 && s.dim == 1;
}

KVStrides in_units(KVStrides s, int64_t units) {
  return {s.layer / units, s.block / units, s.head / units, s.token / units, 1};
}

template <typename Index>
cudaError_t dispatch_unit(CompactArgs a, cudaStream_t stream) {
  // 16-byte units when every token row is contiguous and aligned.
  const int64_t row_bytes = a.head_dim * a.element_size;
  const int64_t per16 = 16 / a.element_size;
  if (row_bytes % 16 == 0 && divisible(a.sk, per16) && divisible(a.sv, per16) &&
      divisible(a.dk, per16) && divisible(a.dv, per16) && aligned(a.src_k, 16) &&
      aligned(a.src_v, 16) && aligned(a.dst_k, 16) && aligned(a.dst_v, 16)) {
    a.sk = in_units(a.sk, per16);
    a.sv = in_units(a.sv, per16);
    a.dk = in_units(a.dk, per16);
    a.dv = in_units(a.dv, per16);
    return launch_compact_typed<uint4, Index>(a, row_bytes / 16, stream);
  }
  switch (a.element_size) {
    case 1: return launch_compact_typed<uint8_t, Index>(a, a.head_dim, stream);
    case 2: return launch_compact_typed<uint16_t, Index>(a, a.head_dim, stream);
    case 4: return launch_compact_typed<uint32_t, Index>(a, a.head_dim, stream);
    default: return cudaErrorInvalidValue;
  }
}

// --------------------------------------------------------------------------
// quantization
// --------------------------------------------------------------------------
using quant::to_float;

// Generic layout: one thread per (row, group), any strides.  Along a strided
// (per-channel) axis the threads of a warp take consecutive rows, so the
// warp's loads of one element index are coalesced; along a contiguous row the
// vector kernels below are used where they apply.
template <typename T, typename P, int BITS>
__global__ void quantize_kernel(QuantArgs a) {
  constexpr int kPer = 8 / BITS;
  const int64_t n_groups = a.n_c / a.group_size;
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= a.n_a * a.n_r * n_groups) return;
  const int64_t row = id / n_groups;
  const int64_t g = id % n_groups;
  const T* x = static_cast<const T*>(a.x) + (row / a.n_r) * a.s_a + (row % a.n_r) * a.s_r +
               g * a.group_size * a.s_c;
  float mn = to_float(x[0]);
  float mx = mn;
  for (int j = 1; j < a.group_size; ++j) {
    const float v = to_float(x[j * a.s_c]);
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
  }
  P zero_p, scale_p;
  quant::group_params<P, BITS>(mn, mx, &zero_p, &scale_p);
  static_cast<P*>(a.scale)[id] = scale_p;
  static_cast<P*>(a.zero)[id] = zero_p;
  const float zero = to_float(zero_p);
  const float scale = to_float(scale_p);
  uint8_t* out = a.packed + row * (a.n_c / kPer) + g * (a.group_size / kPer);
  for (int b = 0; b < a.group_size / kPer; ++b) {
    unsigned byte = 0;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      byte |= quant::code<BITS>(to_float(x[(b * kPer + j) * a.s_c]), zero, scale) << (j * BITS);
    }
    out[b] = static_cast<uint8_t>(byte);
  }
}

template <typename T, typename P, int BITS>
__global__ void dequantize_kernel(QuantArgs a) {
  constexpr int kPer = 8 / BITS;
  constexpr unsigned kMask = (1u << BITS) - 1;
  const int64_t n_groups = a.n_c / a.group_size;
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= a.n_a * a.n_r * n_groups) return;
  const int64_t row = id / n_groups;
  const int64_t g = id % n_groups;
  const float scale = to_float(static_cast<const P*>(a.scale)[id]);
  const float zero = to_float(static_cast<const P*>(a.zero)[id]);
  const uint8_t* in = a.packed + row * (a.n_c / kPer) + g * (a.group_size / kPer);
  T* out = static_cast<T*>(a.out) + (row / a.n_r) * a.s_a + (row % a.n_r) * a.s_r +
           g * a.group_size * a.s_c;
  for (int b = 0; b < a.group_size / kPer; ++b) {
    const unsigned byte = in[b];
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const float q = static_cast<float>((byte >> (j * BITS)) & kMask);
      out[(b * kPer + j) * a.s_c] =
          quant::from_float<T>(quant::add_rn(quant::mul_rn(q, scale), zero));
    }
  }
}

// Vector layout (contiguous groups, see kvshrink_quant_math.cuh): L lanes per
// group, one 16-byte load or store per lane, the group's min / max reduced
// over its L lanes with shuffles, one packed word per lane.  L is a power of
// two <= 32, so a group never straddles warps; threads past the end still
// take part in the shuffles (full mask) and store nothing.
template <typename Word> __device__ __forceinline__ void store_word(uint8_t* p, uint64_t w) {
  *reinterpret_cast<Word*>(p) = static_cast<Word>(w);
}

template <typename T, int BITS>
__device__ __forceinline__ void store_packed(uint8_t* p, uint64_t w) {
  constexpr int kBytes = quant::Word<T, BITS>::kBytes;
  if constexpr (kBytes == 8) store_word<unsigned long long>(p, w);
  else if constexpr (kBytes == 4) store_word<uint32_t>(p, w);
  else if constexpr (kBytes == 2) store_word<uint16_t>(p, w);
  else store_word<uint8_t>(p, w);
}

template <typename T, int BITS>
__device__ __forceinline__ uint64_t load_packed(const uint8_t* p) {
  constexpr int kBytes = quant::Word<T, BITS>::kBytes;
  if constexpr (kBytes == 8) return *reinterpret_cast<const unsigned long long*>(p);
  else if constexpr (kBytes == 4) return *reinterpret_cast<const uint32_t*>(p);
  else if constexpr (kBytes == 2) return *reinterpret_cast<const uint16_t*>(p);
  else return *p;
}

template <typename T, typename P, int BITS>
__global__ void quantize_vector_kernel(QuantArgs a, int lanes) {
  constexpr int kElems = quant::Lanes<T>::kElems;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t unit = t / lanes;
  const int lane = static_cast<int>(t % lanes);
  const int64_t n_units = a.n_a * a.n_r * (a.n_c / a.group_size);
  const bool valid = unit < n_units;
  const quant::VectorAddress addr = quant::vector_address<T, BITS>(
      valid ? unit : 0, lane, a.n_r, a.n_c, a.group_size, a.s_a, a.s_r);
  union {
    uint4 raw;
    T v[kElems];
  } in;
  in.raw = valid ? *reinterpret_cast<const uint4*>(static_cast<const T*>(a.x) + addr.x)
                 : make_uint4(0, 0, 0, 0);
  float v[kElems];
  float mn = to_float(in.v[0]), mx = mn;
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    v[e] = to_float(in.v[e]);
    mn = fminf(mn, v[e]);
    mx = fmaxf(mx, v[e]);
  }
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, offset, lanes));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset, lanes));
  }
  if (!valid) return;  // after the last shuffle
  P zero_p, scale_p;
  quant::group_params<P, BITS>(mn, mx, &zero_p, &scale_p);
  if (lane == 0) {
    static_cast<P*>(a.scale)[unit] = scale_p;
    static_cast<P*>(a.zero)[unit] = zero_p;
  }
  store_packed<T, BITS>(a.packed + addr.packed,
                        quant::pack_lane<T, BITS>(v, to_float(zero_p), to_float(scale_p)));
}

template <typename T, typename P, int BITS>
__global__ void dequantize_vector_kernel(QuantArgs a, int lanes) {
  constexpr int kElems = quant::Lanes<T>::kElems;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t unit = t / lanes;
  if (unit >= a.n_a * a.n_r * (a.n_c / a.group_size)) return;  // no shuffles here
  const int lane = static_cast<int>(t % lanes);
  const quant::VectorAddress addr = quant::vector_address<T, BITS>(
      unit, lane, a.n_r, a.n_c, a.group_size, a.s_a, a.s_r);
  const float scale = to_float(static_cast<const P*>(a.scale)[unit]);
  const float zero = to_float(static_cast<const P*>(a.zero)[unit]);
  union {
    uint4 raw;
    T v[kElems];
  } out;
  quant::unpack_lane<T, BITS>(load_packed<T, BITS>(a.packed + addr.packed), scale, zero, out.v);
  *reinterpret_cast<uint4*>(static_cast<T*>(a.out) + addr.x) = out.raw;
}

// Lanes per group for the vector kernels, or 0 where they do not apply: the
// grouped axis contiguous, 16-byte aligned rows and groups of 16*L bytes with
// L a power of two <= 32, and the packed words aligned.
template <typename T, int BITS>
int vector_lanes(const QuantArgs& a, const void* data) {
  const int64_t size = static_cast<int64_t>(sizeof(T));
  const int64_t group_bytes = a.group_size * size;
  if (a.s_c != 1 || group_bytes % 16 != 0) return 0;
  const int64_t lanes = group_bytes / 16;
  if (lanes > 32 || (lanes & (lanes - 1)) != 0) return 0;
  if ((a.s_r * size) % 16 != 0 || (a.s_a * size) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(data) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(a.packed) % quant::Word<T, BITS>::kBytes != 0) {
    return 0;
  }
  return static_cast<int>(lanes);
}

template <template <typename, typename, int> class Launch, typename T, typename P>
cudaError_t by_bits(const QuantArgs& a, cudaStream_t s) {
  switch (a.bits) {
    case 2: return Launch<T, P, 2>::run(a, s);
    case 4: return Launch<T, P, 4>::run(a, s);
    case 8: return Launch<T, P, 8>::run(a, s);
    default: return cudaErrorInvalidValue;
  }
}

template <template <typename, typename, int> class Launch, typename T>
cudaError_t by_param(const QuantArgs& a, cudaStream_t s) {
  switch (a.param_type) {
    case FloatType::kFloat16: return by_bits<Launch, T, __half>(a, s);
    case FloatType::kBFloat16: return by_bits<Launch, T, __nv_bfloat16>(a, s);
    case FloatType::kFloat32: return by_bits<Launch, T, float>(a, s);
  }
  return cudaErrorInvalidValue;
}

template <template <typename, typename, int> class Launch>
cudaError_t by_type(const QuantArgs& a, cudaStream_t s) {
  switch (a.x_type) {
    case FloatType::kFloat16: return by_param<Launch, __half>(a, s);
    case FloatType::kBFloat16: return by_param<Launch, __nv_bfloat16>(a, s);
    case FloatType::kFloat32: return by_param<Launch, float>(a, s);
  }
  return cudaErrorInvalidValue;
}

unsigned blocks_for(const QuantArgs& a, int64_t threads_per_group) {
  const int64_t n = a.n_a * a.n_r * (a.n_c / a.group_size) * threads_per_group;
  return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

template <typename T, typename P, int BITS>
struct QuantizeLaunch {
  static cudaError_t run(const QuantArgs& a, cudaStream_t s) {
    if (const int lanes = vector_lanes<T, BITS>(a, a.x)) {
      quantize_vector_kernel<T, P, BITS><<<blocks_for(a, lanes), kThreads, 0, s>>>(a, lanes);
    } else {
      quantize_kernel<T, P, BITS><<<blocks_for(a, 1), kThreads, 0, s>>>(a);
    }
    return cudaGetLastError();
  }
};

template <typename T, typename P, int BITS>
struct DequantizeLaunch {
  static cudaError_t run(const QuantArgs& a, cudaStream_t s) {
    if (const int lanes = vector_lanes<T, BITS>(a, a.out)) {
      dequantize_vector_kernel<T, P, BITS><<<blocks_for(a, lanes), kThreads, 0, s>>>(a, lanes);
    } else {
      dequantize_kernel<T, P, BITS><<<blocks_for(a, 1), kThreads, 0, s>>>(a);
    }
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t launch_compact(const CompactArgs& args, cudaStream_t stream) {
  if (args.n_keep == 0 || args.n_layers * args.n_heads == 0) return cudaSuccess;
  return args.index_is_int64 ? dispatch_unit<int64_t>(args, stream)
                             : dispatch_unit<int32_t>(args, stream);
}

cudaError_t launch_quantize(const QuantArgs& args, cudaStream_t stream) {
  if (args.n_a * args.n_r * args.n_c == 0) return cudaSuccess;
  return by_type<QuantizeLaunch>(args, stream);
}

cudaError_t launch_dequantize(const QuantArgs& args, cudaStream_t stream) {
  if (args.n_a * args.n_r * args.n_c == 0) return cudaSuccess;
  return by_type<DequantizeLaunch>(args, stream);
}

}  // namespace kvshrink
