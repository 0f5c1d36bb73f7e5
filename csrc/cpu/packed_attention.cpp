// Attention over a plain region plus packed (quantized) segments, on the CPU:
// torch.ops.kvshrink_cpu.packed_attention, built by
// vllm_kvshrink/kernels/cpu_ext.py.  Semantics: vllm_kvshrink/kernels/
// packed_attention.py (reference()); page format: vllm_kvshrink/storage/paged.py.
// The Python wrapper checks arguments with clear messages; the checks here are
// the last line.
//
// One work item is (request, KV head, tile of queries): all G query heads of
// that KV head times the tile's queries (every query of a decode step), so
// each K/V token is read and dequantized once per item, C tokens at a time,
// into small float buffers; one online softmax (fp32) over everything.
// Queries come in, and outputs go out, in the model's dtype: a rotated form's
// Hadamard rotation (queries in, its share of the output back) is done here
// on each row (a fast Walsh-Hadamard transform), and each output row is
// written where the caller asks (out_start), so attention writes straight
// into vLLM's output tensor.

#include <ATen/ATen.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "page_format.h"

namespace kvshrink_cpu {
namespace {

constexpr int MAX_D = 256;   // largest head dim
constexpr int TILE_ROWS = 64;  // query rows (queries x heads) per work item
constexpr int RB = 4;        // rows per register block
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Form table columns (PackedBatch.form_table()).
enum { F_KBITS, F_VBITS, F_ROT, F_CAP, F_KOFF, F_VOFF, F_POFF, F_COLS };

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// One vector: 16 floats where the target has AVX-512, else 8 (a 16-float
// generic vector on AVX2 is two ymm halves per operation and spills the
// register blocks below).
#if defined(__AVX512F__)
typedef float vf __attribute__((vector_size(64)));
constexpr int W = 16;
#else
typedef float vf __attribute__((vector_size(32)));
constexpr int W = 8;
#endif
constexpr int C = 2 * W;  // tokens per chunk

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
inline float hsum(vf v) {  // a tree: halves added, not W dependent adds
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#if defined(__AVX512F__)
  const vf8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  const vf8 s8 = v;
#endif
  const vf4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) +
                 __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
#else
#if defined(__AVX512F__)
  const vf8 s8 = vf8{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]} +
                 vf8{v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]};
#else
  const vf8 s8 = v;
#endif
  const vf4 s4 = vf4{s8[0], s8[1], s8[2], s8[3]} + vf4{s8[4], s8[5], s8[6], s8[7]};
#endif
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

typedef int32_t vi __attribute__((vector_size(sizeof(vf))));

// exp(x) for x <= 0 on a whole vector (the softmax weights of W tokens at
// once), branch-free; relative error ~2e-7, exactly 0 below -87 (and for -inf).
inline vf vexp_nonpos(vf x) {
  const vf lo = vf{} - 87.0f;
  const vi under = x < lo;
  const vf xc = under ? lo : x;
  const vf magic = vf{} + 12582912.0f;  // 1.5 * 2^23: round to nearest integer
  const vf n = (xc * 1.44269504088896341f + magic) - magic;
  const vf r = xc - n * 0.693359375f - n * -2.12194440e-4f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf sc;
  std::memcpy(&sc, &e, sizeof sc);
  const vf out = p * sc;
  return under ? vf{} : out;
}

inline float exp_nonpos(float x) { return vexp_nonpos(vf{} + x)[0]; }

inline float hmax(vf v) {  // a tree, as hsum: halves compared, not W dependent steps
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#if defined(__AVX512F__)
  const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
            b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf8 s8 = a > b ? a : b;
#else
  const vf8 s8 = v;
#endif
  const vf4 c = __builtin_shufflevector(s8, s8, 0, 1, 2, 3),
            e = __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  const vf4 s4 = c > e ? c : e;
  const float x = s4[0] > s4[2] ? s4[0] : s4[2], y = s4[1] > s4[3] ? s4[1] : s4[3];
  return x > y ? x : y;
#else
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
#endif
}

// Lane index 0..W-1.
inline vf iota() {
  vf v;
  for (int i = 0; i < W; ++i) v[i] = float(i);
  return v;
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// Eight tokens' dot products with one query row, K row-major: eight
// accumulators over the channels, then one transpose-and-add (three rounds
// of horizontal adds) instead of eight separate horizontal sums.
inline void scores8(const float* __restrict q, int d, const float* __restrict k, int64_t ldk,
                    float* __restrict s) {
  __m256 a[8];
#pragma GCC unroll 8
  for (int t = 0; t < 8; ++t) a[t] = _mm256_setzero_ps();
  for (int e = 0; e < d; e += 8) {
    const __m256 qv = _mm256_loadu_ps(q + e);
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) a[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + t * ldk + e), a[t]);
  }
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 h03 = _mm256_hadd_ps(h01, h23), h47 = _mm256_hadd_ps(h45, h67);
  _mm256_storeu_ps(s, _mm256_add_ps(_mm256_permute2f128_ps(h03, h47, 0x20),
                                    _mm256_permute2f128_ps(h03, h47, 0x31)));
}
#endif

#if defined(__AVX512F__)
// Sixteen tokens' dot products with one query row, K row-major: sixteen
// accumulators over the channels, then one transposing reduction (halves,
// quarters, then pairs within quarters added: 15 shuffles pairs for 16 sums)
// instead of sixteen separate horizontal sums.  The reduction leaves
// accumulator 4j + q's sum in lane 4q + j, so accumulator s takes token
// 4 (s % 4) + s / 4 and lane i ends up holding token i.
inline void scores16(const float* __restrict q, int d, const float* __restrict k, int64_t ldk,
                     float* __restrict s) {
  __m512 a[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) a[t] = _mm512_setzero_ps();
  for (int e = 0; e < d; e += 16) {
    const __m512 qv = _mm512_loadu_ps(q + e);
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t)
      a[t] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + (4 * (t % 4) + t / 4) * ldk + e), a[t]);
  }
  __m512 h[8], z[4], w[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // 256-bit halves: lanes 0-7 a[2i]'s, 8-15 a[2i+1]'s
    h[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // quarter j of z[i]: a[4i + j]'s four partial sums
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(h[2 * i], h[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(h[2 * i], h[2 * i + 1], 0xDD));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(z[2 * i], z[2 * i + 1], 0x88),
                         _mm512_shuffle_ps(z[2 * i], z[2 * i + 1], 0xDD));
  _mm512_storeu_ps(s, _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88),
                                    _mm512_shuffle_ps(w[0], w[1], 0xDD)));
}
#endif

// S[r][c] = Q[r] . K[c], K row-major (token c at K + c*ldk), c < nc; R rows
// (1..4: the accumulators stay in registers).
template <int R>
inline void scores_rows(const float* __restrict q, int d, int nc, const float* __restrict k,
                        int64_t ldk, float* __restrict s) {
  static_assert(R >= 1 && R <= 4, "1 to 4 rows");
  int c0 = 0;
#if defined(__AVX512F__)
  for (; c0 + 16 <= nc; c0 += 16)
    for (int i = 0; i < R; ++i) scores16(q + i * d, d, k + c0 * ldk, ldk, s + i * C + c0);
#elif defined(__AVX2__)
  for (; c0 + 8 <= nc; c0 += 8)
    for (int i = 0; i < R; ++i) scores8(q + i * d, d, k + c0 * ldk, ldk, s + i * C + c0);
#endif
  for (int c = c0; c < nc; ++c) {
    const float* kc = k + c * ldk;
    vf a[R] = {};
    for (int e = 0; e < d; e += W) {
      const vf kv = vload(kc + e);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) a[i] += vload(q + i * d + e) * kv;
    }
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) s[i * C + c] = hsum(a[i]);
  }
}

// Same with K transposed (channel e at K + e*ldk, C readable tokens each).
template <int R>
inline void scores_cols(const float* __restrict q, int d, const float* __restrict k,
                        int64_t ldk, float* __restrict s) {
  static_assert(C == 2 * W, "a chunk is two vectors");
  vf a[R][2] = {};
  for (int e = 0; e < d; ++e) {
    const float* ke = k + e * ldk;
    const vf k0 = vload(ke), k1 = vload(ke + W);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const float qe = q[i * d + e];
      a[i][0] += qe * k0;
      a[i][1] += qe * k1;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    vstore(s + i * C, a[i][0]);
    vstore(s + i * C + W, a[i][1]);
  }
}

// acc[r] += sum_c P[r][c] * V[c], V row-major with row stride d; NV vectors
// of channels per pass.
template <int R, int NV>
inline void accumulate_tiles(const float* __restrict p, int d, int nc,
                             const float* __restrict v, float* __restrict acc) {
  for (int e0 = 0; e0 < d; e0 += NV * W) {
    vf a[R][NV];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) a[i][j] = vload(acc + i * d + e0 + j * W);
    for (int c = 0; c < nc; ++c) {
      const float* vc = v + c * d + e0;
      vf vv[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) vv[j] = vload(vc + j * W);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const float pc = p[i * C + c];
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) a[i][j] += pc * vv[j];
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) vstore(acc + i * d + e0 + j * W, a[i][j]);
  }
}

template <int R>
inline void accumulate_rows(const float* p, int d, int nc, const float* v, float* acc) {
  if (d % (2 * W) == 0) accumulate_tiles<R, 2>(p, d, nc, v, acc);
  else accumulate_tiles<R, 1>(p, d, nc, v, acc);
}

// Softmax state of one work item.
struct State {
  int rows = 0, d = 0;
  std::vector<float> m, l, acc, acc_rot, s;
  bool has_rot = false;

  void init(int rows_, int d_, bool rot) {
    rows = rows_;
    d = d_;
    has_rot = rot;
    m.assign(rows, NEG_INF);
    l.assign(rows, 0.0f);
    acc.assign(size_t(rows) * d, 0.0f);
    acc_rot.assign(rot ? size_t(rows) * d : 0, 0.0f);
    s.assign(size_t(rows) * C, 0.0f);
  }

  // One chunk of nc tokens.  k: row-major (ldk per token) or, when
  // k_cols, transposed (ldk per channel, C readable tokens per channel).
  // valid: per row, how many leading tokens it sees (nullptr: all).
  void chunk(const float* q, int nc, const float* k, int64_t ldk, bool k_cols,
             const float* v, const int* valid, bool rot) {
    const int full = rows - rows % RB;
    for (int r = 0; r < full; r += RB) scores<RB>(q, r, nc, k, ldk, k_cols);
    switch (rows - full) {  // the last rows in one register block too
      case 3: scores<3>(q, full, nc, k, ldk, k_cols); break;
      case 2: scores<2>(q, full, nc, k, ldk, k_cols); break;
      case 1: scores<1>(q, full, nc, k, ldk, k_cols); break;
      default: break;
    }
    for (int r = 0; r < rows; ++r) {
      float* sr = s.data() + r * C;
      const int nv = valid ? valid[r] : nc;
      if (nv <= 0) {
        for (int c = 0; c < nc; ++c) sr[c] = 0.0f;
        continue;
      }
      // A chunk is two vectors; lanes at or past nv are not seen.
      const vf lane = iota();
      const vf lim = vf{} + float(nv);
      const vi in0 = lane < lim, in1 = (lane + float(W)) < lim;
      const vf ninf = vf{} + NEG_INF;
      const vf s0 = vload(sr), s1 = vload(sr + W);
      const vf m0 = in0 ? s0 : ninf, m1 = in1 ? s1 : ninf;
      const float cmx = hmax(m0 > m1 ? m0 : m1);
      const float mx = cmx > m[r] ? cmx : m[r];
      // 0 while m is -inf; 1 (what exp(0) gives) while the maximum holds
      const float corr = mx > m[r] ? exp_nonpos(m[r] - mx) : 1.0f;
      const vf p0 = in0 ? vexp_nonpos(s0 - mx) : vf{};
      const vf p1 = in1 ? vexp_nonpos(s1 - mx) : vf{};
      vstore(sr, p0);
      vstore(sr + W, p1);
      const float sum = hsum(p0 + p1);
      l[r] = l[r] * corr + sum;
      if (mx > m[r]) {
        m[r] = mx;
        float* ar = acc.data() + size_t(r) * d;
#pragma omp simd
        for (int e = 0; e < d; ++e) ar[e] *= corr;
        if (has_rot) {
          float* br = acc_rot.data() + size_t(r) * d;
#pragma omp simd
          for (int e = 0; e < d; ++e) br[e] *= corr;
        }
      }
    }
    float* out = rot ? acc_rot.data() : acc.data();
    for (int r = 0; r < full; r += RB)
      accumulate_rows<RB>(s.data() + r * C, d, nc, v, out + size_t(r) * d);
    float* o = out + size_t(full) * d;
    const float* p = s.data() + full * C;
    switch (rows - full) {
      case 3: accumulate_rows<3>(p, d, nc, v, o); break;
      case 2: accumulate_rows<2>(p, d, nc, v, o); break;
      case 1: accumulate_rows<1>(p, d, nc, v, o); break;
      default: break;
    }
  }

  template <int R>
  void scores(const float* q, int r, int nc, const float* k, int64_t ldk, bool k_cols) {
    if (k_cols) scores_cols<R>(q + r * d, d, k, ldk, s.data() + r * C);
    else scores_rows<R>(q + r * d, d, nc, k, ldk, s.data() + r * C);
  }
};

struct Item {
  int64_t req, head, q0, nq, cost;
};

struct Args {
  const void* q;  // [T, Hq, D] in q_dtype
  void* out;      // [T_out, Hq, D] in out_dtype
  at::ScalarType q_dtype, out_dtype;
  const uint8_t* cache;
  int64_t esize, sb, sh;  // element size, block / head strides (elements)
  int64_t hq, hkv, bs, d, layout;
  // layout 2: element offsets in a (block, head) region of K / V element
  // (t, e) at [t * D + e] (any in-block layout, e.g. vLLM's AMX tiles)
  const int32_t* k_index;
  const int32_t* v_index;
  const int64_t* q_start;
  const int64_t* q_len;
  const int64_t* plain_len;
  const int32_t* table;
  int64_t table_w;
  const int64_t* seg_start;
  const int64_t* seg_block;
  const int64_t* seg_form;
  const int64_t* seg_n;
  const int64_t* forms;
  const int64_t* out_start;
  float scale;
};

// Element i of a float tensor of dtype dt, as float.
inline float load(const void* base, at::ScalarType dt, int64_t i) {
  switch (dt) {
    case at::kFloat: return static_cast<const float*>(base)[i];
    case at::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
    default: return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
  }
}

inline void store(void* base, at::ScalarType dt, int64_t i, float x) {
  switch (dt) {
    case at::kFloat: static_cast<float*>(base)[i] = x; break;
    case at::kBFloat16: static_cast<c10::BFloat16*>(base)[i] = c10::BFloat16(x); break;
    default: static_cast<c10::Half*>(base)[i] = c10::Half(x); break;
  }
}

template <typename T>
void run_item(const Args& a, const Item& it) {
  const int d = int(a.d);
  const int64_t g = a.hq / a.hkv;
  const int rows = int(it.nq * g);
  const int64_t r = it.req, h = it.head;
  const int64_t qs = a.q_start[r] + it.q0;
  const int64_t s0 = a.seg_start[r], s1 = a.seg_start[r + 1];
  bool rot = false;
  for (int64_t i = s0; i < s1; ++i) rot |= a.forms[a.seg_form[i] * F_COLS + F_ROT] != 0;

  // Queries of the tile, scaled: row = query * G + head in group.
  std::vector<float> qb(size_t(rows) * d), qr(rot ? size_t(rows) * d : 0);
  for (int64_t i = 0; i < it.nq; ++i)
    for (int64_t j = 0; j < g; ++j) {
      const int64_t src = ((qs + i) * a.hq + h * g + j) * d;
      float* dst = qb.data() + (i * g + j) * d;
      for (int e = 0; e < d; ++e) dst[e] = load(a.q, a.q_dtype, src + e) * a.scale;
      if (rot) {
        float* dr = qr.data() + (i * g + j) * d;
        std::memcpy(dr, dst, sizeof(float) * d);
        hadamard_row(dr, d);
      }
    }
  State st;
  st.init(rows, d, rot);
  alignas(64) float kb[C * MAX_D];
  alignas(64) float vb[C * MAX_D];

  // Packed segments: every query sees all their tokens.
  for (int64_t si = s0; si < s1; ++si) {
    const int64_t* f = a.forms + a.seg_form[si] * F_COLS;
    const int kbits = int(f[F_KBITS]), vbits = int(f[F_VBITS]);
    const bool srot = f[F_ROT] != 0;
    const int64_t kc = a.d * kbits / 8, vc = a.d * vbits / 8;
    const uint8_t* base = a.cache + (a.seg_block[si] * a.sb + h * a.sh) * a.esize;
    const uint8_t* kcodes = base + f[F_KOFF];
    const uint8_t* vcodes = base + f[F_VOFF];
    const uint8_t* params = base + f[F_POFF];
    const int64_t n = a.seg_n[si];
    for (int64_t t0 = 0; t0 < n; t0 += C) {
      const int nc = int(std::min<int64_t>(C, n - t0));
      for (int c = 0; c < nc; ++c) {
        const int64_t t = t0 + c;
        const uint8_t* pp = params + t * PARAM_BYTES;
        dequant(kbits, kcodes + t * kc, bf16_bits(pp), bf16_bits(pp + 2), kb + c * d, d);
        dequant(vbits, vcodes + t * vc, bf16_bits(pp + 4), bf16_bits(pp + 6), vb + c * d, d);
      }
      st.chunk(srot ? qr.data() : qb.data(), nc, kb, d, false, vb, nullptr, srot);
    }
  }

  // Plain region, causal: query i of the request sees positions <= off + i.
  const int64_t off = a.plain_len[r] - a.q_len[r];
  const int64_t last = off + it.q0 + it.nq - 1;  // newest position the tile sees
  const int32_t* row_blocks = a.table + r * a.table_w;
  const T* cache = reinterpret_cast<const T*>(a.cache);
  constexpr bool direct = std::is_same<T, float>::value;
  std::vector<int> valid(rows);
  for (int64_t p0 = 0; p0 <= last;) {
    const int64_t slot = p0 % a.bs;
    const int nc = int(std::min<int64_t>({C, a.bs - slot, last + 1 - p0}));
    const T* reg = cache + int64_t(row_blocks[p0 / a.bs]) * a.sb + h * a.sh;
    bool all = true;
    for (int64_t i = 0; i < it.nq; ++i) {
      const int64_t lim = off + it.q0 + i - p0 + 1;
      const int nv = int(std::max<int64_t>(0, std::min<int64_t>(nc, lim)));
      all &= nv == nc;
      for (int64_t j = 0; j < g; ++j) valid[i * g + j] = nv;
    }
    const float* k;
    int64_t ldk;
    const bool cols = a.layout == 0;
    if (a.layout == 2) {  // index maps: gathered into row-major buffers
      for (int c = 0; c < nc; ++c) {
        const int32_t* ki = a.k_index + (slot + c) * a.d;
        const int32_t* vi = a.v_index + (slot + c) * a.d;
        for (int e = 0; e < d; ++e) {
          kb[c * d + e] = to_float(reg[ki[e]]);
          vb[c * d + e] = to_float(reg[vi[e]]);
        }
      }
      st.chunk(qb.data(), nc, kb, d, false, vb, all ? nullptr : valid.data(), false);
      p0 += nc;
      continue;
    }
    if (cols) {  // K element (t, e) at e*bs + t
      const T* src = reg + slot;
      if (direct && nc == C) {
        k = reinterpret_cast<const float*>(src);
        ldk = a.bs;
      } else {
        for (int e = 0; e < d; ++e) {
          for (int c = 0; c < nc; ++c) kb[e * C + c] = to_float(src[e * a.bs + c]);
          for (int c = nc; c < C; ++c) kb[e * C + c] = 0.0f;
        }
        k = kb;
        ldk = C;
      }
    } else {  // K element (t, e) at t*D + e
      const T* src = reg + slot * a.d;
      if (direct) {
        k = reinterpret_cast<const float*>(src);
      } else {
        for (int64_t i = 0; i < int64_t(nc) * d; ++i) kb[i] = to_float(src[i]);
        k = kb;
      }
      ldk = d;
    }
    const T* vsrc = reg + a.bs * a.d + slot * a.d;
    const float* v;
    if (direct) {
      v = reinterpret_cast<const float*>(vsrc);
    } else {
      for (int64_t i = 0; i < int64_t(nc) * d; ++i) vb[i] = to_float(vsrc[i]);
      v = vb;
    }
    st.chunk(qb.data(), nc, k, ldk, cols, v, all ? nullptr : valid.data(), false);
    p0 += nc;
  }

  // Normalise and store.
  const int64_t os = a.out_start[r] + it.q0;
  for (int64_t i = 0; i < it.nq; ++i)
    for (int64_t j = 0; j < g; ++j) {
      const int row = int(i * g + j);
      const float inv = st.l[row] > 0.0f ? 1.0f / st.l[row] : 0.0f;
      const int64_t dst = ((os + i) * a.hq + h * g + j) * d;
      const float* ar = st.acc.data() + size_t(row) * d;
      alignas(64) float o[MAX_D];
      for (int e = 0; e < d; ++e) o[e] = ar[e] * inv;
      if (rot) {  // the rotated values' share, rotated back
        alignas(64) float b[MAX_D];
        const float* br = st.acc_rot.data() + size_t(row) * d;
        for (int e = 0; e < d; ++e) b[e] = br[e] * inv;
        hadamard_row(b, d);
        for (int e = 0; e < d; ++e) o[e] += b[e];
      }
      for (int e = 0; e < d; ++e) store(a.out, a.out_dtype, dst + e, o[e]);
    }
}

void check_index(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() &&
                  t.dim() == dim,
              name, " must be a contiguous CPU ", dtype, " tensor of ", dim,
              " dims, got ", t.scalar_type(), " ", t.sizes());
}

void check_float(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == 3 &&
                  (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf),
              name, " must be a contiguous 3-d CPU float32/bfloat16/float16 tensor, got ",
              dt, " ", t.sizes());
}

void packed_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& cache,
                      int64_t layout, const at::Tensor& k_index, const at::Tensor& v_index,
                      const at::Tensor& q_start, const at::Tensor& q_len,
                      const at::Tensor& plain_len, const at::Tensor& plain_table,
                      const at::Tensor& seg_start, const at::Tensor& seg_block,
                      const at::Tensor& seg_form, const at::Tensor& seg_n,
                      const at::Tensor& form_table, const at::Tensor& out_start,
                      double scale) {
  check_float(q, "q");
  check_float(out, "out");
  TORCH_CHECK(cache.device().is_cpu() && cache.dim() == 4, "cache must be a 4-d CPU tensor");
  const auto dt = cache.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "cache dtype must be float32, bfloat16 or float16, got ", dt);
  const int64_t hq = q.size(1), d = q.size(2);
  const int64_t hkv = cache.size(1), bs = cache.size(2);
  TORCH_CHECK(cache.size(3) == 2 * d && cache.stride(3) == 1 && cache.stride(2) == 2 * d,
              "cache must be [NB, Hkv, bs, 2D] with contiguous (block, head) regions");
  TORCH_CHECK(d >= 16 && d <= MAX_D && (d & (d - 1)) == 0,
              "head dim must be a power of two in [16, 256], got ", d);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "Hq must be a multiple of Hkv");
  TORCH_CHECK(layout == 0 || layout == 1 || layout == 2, "layout must be 0, 1 or 2");
  if (layout == 2) {
    for (const at::Tensor* t : {&k_index, &v_index}) {
      check_index(*t, "k_index / v_index", at::kInt, 1);
      TORCH_CHECK(t->size(0) == bs * d, "an index map must hold block_size * D offsets");
      TORCH_CHECK(t->min().item<int32_t>() >= 0 && t->max().item<int32_t>() < 2 * bs * d,
                  "an index map points outside its (block, head) region");
    }
  }
  TORCH_CHECK(out.size(1) == hq && out.size(2) == d, "out must be [T, Hq, D]");
  check_index(q_start, "q_start", at::kLong, 1);
  check_index(q_len, "q_len", at::kLong, 1);
  check_index(plain_len, "plain_len", at::kLong, 1);
  check_index(plain_table, "plain_table", at::kInt, 2);
  check_index(seg_start, "seg_start", at::kLong, 1);
  check_index(seg_block, "seg_block", at::kLong, 1);
  check_index(seg_form, "seg_form", at::kLong, 1);
  check_index(seg_n, "seg_n", at::kLong, 1);
  check_index(form_table, "form_table", at::kLong, 2);
  check_index(out_start, "out_start", at::kLong, 1);
  const int64_t nr = q_len.size(0);
  TORCH_CHECK(seg_start.size(0) == nr + 1 && plain_table.size(0) == nr,
              "seg_start must be [R + 1] and plain_table [R, W]");
  TORCH_CHECK(form_table.size(1) == F_COLS, "form_table must be [F, 7]");
  TORCH_CHECK(out_start.size(0) == nr, "out_start must be [R]");
  for (int64_t r = 0; r < nr; ++r)
    TORCH_CHECK(out_start.data_ptr<int64_t>()[r] >= 0 &&
                    out_start.data_ptr<int64_t>()[r] + q_len.data_ptr<int64_t>()[r] <= out.size(0),
                "out_start + q_len reaches past out's ", out.size(0), " rows");

  Args a{};
  a.q = q.data_ptr();
  a.out = out.data_ptr();
  a.q_dtype = q.scalar_type();
  a.out_dtype = out.scalar_type();
  a.cache = static_cast<const uint8_t*>(cache.data_ptr());
  a.esize = cache.element_size();
  a.sb = cache.stride(0);
  a.sh = cache.stride(1);
  a.hq = hq;
  a.hkv = hkv;
  a.bs = bs;
  a.d = d;
  a.layout = layout;
  a.k_index = layout == 2 ? k_index.data_ptr<int32_t>() : nullptr;
  a.v_index = layout == 2 ? v_index.data_ptr<int32_t>() : nullptr;
  a.q_start = q_start.data_ptr<int64_t>();
  a.q_len = q_len.data_ptr<int64_t>();
  a.plain_len = plain_len.data_ptr<int64_t>();
  a.table = plain_table.data_ptr<int32_t>();
  a.table_w = plain_table.size(1);
  a.seg_start = seg_start.data_ptr<int64_t>();
  a.seg_block = seg_block.data_ptr<int64_t>();
  a.seg_form = seg_form.data_ptr<int64_t>();
  a.seg_n = seg_n.data_ptr<int64_t>();
  a.forms = form_table.data_ptr<int64_t>();
  a.out_start = out_start.data_ptr<int64_t>();
  a.scale = float(scale);

  // Work items, most expensive first, handed out dynamically.
  const int64_t g = hq / hkv;
  const int64_t tq = std::max<int64_t>(1, TILE_ROWS / g);
  std::vector<Item> items;
  for (int64_t r = 0; r < nr; ++r) {
    int64_t packed = 0;
    for (int64_t s = a.seg_start[r]; s < a.seg_start[r + 1]; ++s) packed += a.seg_n[s];
    for (int64_t q0 = 0; q0 < a.q_len[r]; q0 += tq) {
      const int64_t nq = std::min(tq, a.q_len[r] - q0);
      const int64_t seen = packed + a.plain_len[r] - a.q_len[r] + q0 + nq;
      for (int64_t h = 0; h < hkv; ++h) items.push_back({r, h, q0, nq, seen * nq});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& x, const Item& y) { return x.cost > y.cost; });
  const int64_t n_items = int64_t(items.size());
  if (n_items == 0) return;
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n_items; i = next++) {
      switch (dt) {
        case at::kFloat: run_item<float>(a, items[i]); break;
        case at::kBFloat16: run_item<c10::BFloat16>(a, items[i]); break;
        default: run_item<c10::Half>(a, items[i]); break;
      }
    }
  };
  const int64_t workers = std::min<int64_t>(n_items, at::get_num_threads());
  if (workers <= 1) work(0, 1);
  else at::parallel_for(0, workers, 1, work);
}

}  // namespace

TORCH_LIBRARY(kvshrink_cpu, m) {
  m.def(
      "packed_attention(Tensor(a!) out, Tensor q, "
      "Tensor cache, int layout, Tensor k_index, Tensor v_index, Tensor q_start, Tensor q_len, Tensor plain_len, "
      "Tensor plain_table, Tensor seg_start, Tensor seg_block, Tensor seg_form, "
      "Tensor seg_n, Tensor form_table, Tensor out_start, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(kvshrink_cpu, CPU, m) { m.impl("packed_attention", &packed_attention); }

}  // namespace kvshrink_cpu
