// jsoftmax CPU kernels, called from XLA through its FFI. CMakeLists.txt builds this file once per
// instruction set (JSOFTMAX_ISA: generic, avx2, avx512, avx512bf16) into separate libraries;
// jsoftmax/_kernel.py asks the generic one which the CPU supports, loads that one and registers
// its handlers.
//
// softmax / log_softmax over the last axis, forward and backward, one row at a time: a row is
// read from memory once and stays in cache for the kernel's passes over it, where XLA's fusions
// make three or four passes over the whole array. Rows are split over XLA's intra-op thread pool.
// Computation is in float32 for float32, bfloat16 and float16 storage, rounded once on store.
// The row rules are those of the XLA path in _softmax.py (tests check that both agree):
//   NaN in a row     -> the whole row NaN
//   max = -inf       -> softmax 0, log_softmax -inf (fully masked or empty)
//   max = +inf       -> the k +inf entries get 1/k (log: -log k), the others 0 (log: -inf)
//   otherwise        -> e = exp(x - max), softmax e * (1/sum e), log_softmax (x - max) - log(sum e)
// Backward: softmax dx = y * (g - sum(g * y)); log_softmax g' = (y == -inf ? 0 : g),
// dx = g' - exp(y) * sum(g').
// cross_entropy (integer labels) has two kernels of its own: per-row statistics for the loss, and
// the gradient times the cotangent for reverse mode (see ce_stats_row).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <sched.h>
#include <sys/mman.h>
#endif

namespace ffi = xla::ffi;

namespace {

// One vector is one register of the instruction set the library is built for: wider vectors
// than the registers are split by the compiler, but their selects and comparisons are compiled
// lane by lane (scalar code), which made the avx2 and generic variants several times slower.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vu __attribute__((vector_size(kLanes * 4)));
typedef uint16_t vh __attribute__((vector_size(kLanes * 2)));
typedef _Float16 vhf __attribute__((vector_size(kLanes * 2)));
typedef double vd __attribute__((vector_size(kLanes * 8)));

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline vf splat(float v) { return vf{} + v; }

// Lane reductions as a tree of halves: lane i with lane i + width/2, then the same on the halves
// (the pairing of the lane loops they replace, so sums are bit-identical). GCC compiled those
// loops as a serial chain of fifteen scalar maxima and, for float64 lanes, a loop through the
// stack: a few tens of nanoseconds per row (16384x1000 float16 log_softmax forward, one thread,
// 5% of the time).
template <class V, size_t... I>
inline auto lower_half(V v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, I...);
}
template <class V, size_t... I>
inline auto upper_half(V v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, (I + sizeof...(I))...);
}
template <class V, class Op>
inline auto reduce_lanes(V v, Op op) {
  constexpr size_t kWidth = sizeof(V) / sizeof(v[0]);
  if constexpr (kWidth == 1) {
    return v[0];
  } else {
    constexpr auto half = std::make_index_sequence<kWidth / 2>{};
    return reduce_lanes(op(lower_half(v, half), upper_half(v, half)), op);
  }
}

// The largest lane; lanes must not be NaN (the scan's running maxima never are).
inline float hmax(vf v) {
  return reduce_lanes(v, [](auto a, auto b) { return a > b ? a : b; });
}

inline float hsum(vf v) {
  return reduce_lanes(v, [](auto a, auto b) { return a + b; });
}

inline double hsum(vd v) {
  return reduce_lanes(v, [](auto a, auto b) { return a + b; });
}

inline vd widen(vf v) { return __builtin_convertvector(v, vd); }
inline vf narrow(vd v) { return __builtin_convertvector(v, vf); }

inline bool any(vi m) {
  for (int i = 0; i < kLanes; ++i)
    if (m[i]) return true;
  return false;
}

// e^x for float32 lanes: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two constants so n ln2
// is exact), e^r by a polynomial of degree 6, times 2^n. The coefficients minimise the maximum
// relative error on [-ln2/2, ln2/2] (2e-9 before they are rounded to float32, 1.7e-8 after);
// the result is within 1.06 ulp of e^x on [-88, 88] (every float32, against std::exp in double;
// jax's own exp on this CPU: 1.01 ulp; the Taylor polynomial of degree 7 used before, one FMA
// more: 0.94; the generic library, without FMA: 1.34, before 1.22). Results below FLT_MIN are 0 or subnormal (XLA's CPU code flushes them to 0).
inline vf exp_poly(vf r) {
  vf p = splat(0x1.6ae730p-10f);
  p = p * r + 0x1.126782p-7f;
  p = p * r + 0x1.555822p-5f;
  p = p * r + 0x1.55541ap-3f;
  p = p * r + 0x1.fffffcp-2f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}

#if defined(__AVX512F__)
// AVX-512: a rounding instruction for n and scalef for 2^n (exact, underflows to 0, overflows to
// inf). One clamp, which keeps NaN (max returns its second operand when either is NaN): -inf and
// anything below -120 give exactly 0. No upper clamp (it cost 2% of the forward pass): the
// kernels only pass x <= 0, -inf or NaN; any x up to 22713 (n ln2 still exact) gives e^x or
// +inf, +inf gives NaN.
inline vf vexp(vf x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-120.0f), (__m512)x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf r = (vf)xc - (vf)n * 0.693359375f;
  r = r - (vf)n * -2.12194440e-4f;
  return (vf)_mm512_scalef_ps((__m512)exp_poly(r), n);
}
#else
inline vf vexp(vf x) {
  const vi is_nan = x != x;
  vf xc = is_nan ? splat(0.0f) : x;
  xc = xc < -88.0f ? splat(-88.0f) : xc;
  xc = xc > 88.75f ? splat(88.75f) : xc;
  const vf n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const vf p = exp_poly(r);
  const vi ni = __builtin_convertvector(n, vi);
  // 2^n for n in [-127, 128] as 2^(n - 1) * 2 when n > 0, so the exponent field never overflows.
  const vi positive = ni > 0;
  const vi biased = (positive ? ni - 1 : ni) + 127;
  vf result = p * (vf)(biased << 23);
  result = positive ? result * 2.0f : result;
  result = x < -87.33654f ? splat(0.0f) : result;
  return is_nan ? x : result;
}
#endif


// The row functions (each runs one row or column group through all its passes) are flattened:
// every call in them is inlined. Left to its heuristics, GCC kept vexp out of line in 42 places
// of the AVX512-BF16 library, one of them one exponential in four in the unrolled softmax forward
// pass (a call, its constants loaded again each time); forcing vexp inline alone made it leave the
// per-block lambdas out of line instead in the AVX2 build (16-bit log_softmax forward 20-30%
// slower). Flattened, with results bit-identical (C++ harness, one thread, medians of 21, two to
// four runs): the AVX2 build's passes 0-36% faster (softmax forward 11-17%, log_softmax backward
// 18-22%); in the AVX512-BF16 build, with BF16::load's widening load, the bfloat16 forward passes
// 2-20% faster and its backward passes 0-8%, float16 and float32 level (within +-5%, the spread).
#define JSOFTMAX_ROW_FUNCTION __attribute__((flatten))

// Storage types. Each provides full and partial loads to float32 lanes and rounding stores.
struct F32 {
  using T = float;
  static vf load(const T* p) {
    vf v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
  static float to_float(T v) { return v; }
  static T from_float(float v) { return v; }
  // Float32 values at or below this one are stored as -inf.
  static constexpr float kNegOverflow = -kInf;
  static constexpr float kLowest = -0x1.fffffep+127f;  // the most negative finite value
  static constexpr bool kPairs = false;
};

struct BF16 {
  using T = uint16_t;
  static constexpr float kNegOverflow = -0x1.ffp+127f;  // halfway past the largest bfloat16
  static constexpr float kLowest = -0x1.fep+127f;
  // The 16-bit words widened to 32 bits and shifted into the high half: one widening load and a
  // shift. __builtin_convertvector(vh, vu) compiled to a load, two half-width widenings and an
  // insert before the shift (AVX2 and AVX-512 alike). Measured together with the inlining of
  // the row functions: the bfloat16 figures at JSOFTMAX_ROW_FUNCTION.
  static vf load(const T* p) {
#if defined(__AVX512F__)
    const __m512i words =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return (vf)_mm512_slli_epi32(words, 16);
#elif defined(__AVX2__)
    const __m256i words =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return (vf)_mm256_slli_epi32(words, 16);
#else
    vh h;
    std::memcpy(&h, p, sizeof(h));
    return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
  }
  static void store(T* p, vf v) {
#if defined(__AVX512BF16__)
    // One instruction: nearest-even, NaN kept quiet (results below FLT_MIN flush to 0).
    const __m256bh h = _mm512_cvtneps_pbh((__m512)v);
    std::memcpy(p, &h, sizeof(h));
#else
    const vu bits = (vu)v;
    const vu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // nearest even
    const vu quiet = (bits >> 16) | 0x40u;
    const vu out = (v != v) ? quiet : rounded;
#if defined(__AVX512F__)
    // One narrowing instruction (GCC made a two-source word permutation of the conversion).
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16((__m512i)out));
#else
    const vh h = __builtin_convertvector(out, vh);
    std::memcpy(p, &h, sizeof(h));
#endif
#endif
  }
#if defined(__AVX512BF16__)
  // 2 * kLanes entries as two float32 vectors, the even-indexed entries in one and the
  // odd-indexed in the other: a shift and a mask of the 32-bit words, where load() spends a
  // lane shuffle and a shift per vector. store_pair converts both with one instruction and puts
  // the entries back in order with one word permutation.
  static constexpr bool kPairs = true;
  static void load_pair(const T* p, vf* even, vf* odd) {
    vu words;
    std::memcpy(&words, p, sizeof(words));
    *even = (vf)(words << 16);
    *odd = (vf)(words & 0xffff0000u);
  }
  static void store_pair(T* p, vf even, vf odd) {
    const __m512bh halves = _mm512_cvtne2ps_pbh((__m512)odd, (__m512)even);  // even | odd
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                           24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
                                           1, 16, 0);
    const __m512i out = _mm512_permutexvar_epi16(order, (__m512i)halves);
    std::memcpy(p, &out, sizeof(out));
  }
#else
  static constexpr bool kPairs = false;
#endif
  // Converting the row again in each pass instead of reading a float32 copy: 1024x4096 to
  // 16384x1000, one thread, AVX-512 without BF16, 20-25% slower (forward_copies).
  static constexpr bool kCheapLoad = false;
  static float to_float(T v) {
    const uint32_t bits = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  static T from_float(float f) {
    vf v = splat(f);
    T out[kLanes];
    store(out, v);
    return out[0];
  }
};

struct F16 {
  using T = _Float16;
  static constexpr float kNegOverflow = -65520.0f;  // halfway past the largest float16
  static constexpr float kLowest = -65504.0f;
  // F16C converts a whole register in one instruction (round to nearest even, NaN kept quiet);
  // GCC compiles __builtin_convertvector on _Float16 lanes one lane at a time without
  // AVX512-FP16 (sixteen scalar conversions per vector: float16 ran 2-5x slower than float32).
  static vf load(const T* p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX__) && defined(__F16C__)
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    vhf h;
    std::memcpy(&h, p, sizeof(h));
    return __builtin_convertvector(h, vf);
#endif
  }
  static void store(T* p, vf v) {
#if defined(__AVX512F__)
    const __m256i h = _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
#elif defined(__AVX__) && defined(__F16C__)
    const __m128i h = _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
#else
    const vhf h = __builtin_convertvector(v, vhf);
    std::memcpy(p, &h, sizeof(h));
#endif
  }
  static float to_float(T v) { return float(v); }
  static T from_float(float v) { return T(v); }
  static constexpr bool kPairs = false;
  // Whether load() costs little enough that a pass may convert the row again rather than read a
  // float32 copy (forward_copies): with AVX-512, one instruction per vector.
#if defined(__AVX512F__)
  static constexpr bool kCheapLoad = true;
#else
  static constexpr bool kCheapLoad = false;
#endif
};

// Partial blocks (the last < kLanes entries of a row): padded loads, prefix stores. AVX-512:
// masked loads and stores (the entries past `count` are not touched) instead of element loops
// (16384x1000 bfloat16 and float16, one thread: forward and backward 5-8% faster).
template <class S>
vf load_part(const typename S::T* p, int64_t count, float pad) {
#if defined(__AVX512F__)
  const __mmask16 mask = __mmask16((1u << count) - 1u);
  vf v;
  if constexpr (sizeof(typename S::T) == 4) {
    v = (vf)_mm512_maskz_loadu_ps(mask, p);
  } else {
    const __m256i halves = _mm256_maskz_loadu_epi16(mask, p);
    typename S::T tmp[kLanes];
    std::memcpy(tmp, &halves, sizeof(halves));
    v = S::load(tmp);
  }
  return (vf)_mm512_mask_blend_ps(mask, _mm512_set1_ps(pad), (__m512)v);
#else
  float tmp[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) tmp[i] = i < count ? S::to_float(p[i]) : pad;
  vf v;
  std::memcpy(&v, tmp, sizeof(v));
  return v;
#endif
}

template <class S>
void store_part(typename S::T* p, vf v, int64_t count) {
#if defined(__AVX512F__)
  const __mmask16 mask = __mmask16((1u << count) - 1u);
  if constexpr (sizeof(typename S::T) == 4) {
    _mm512_mask_storeu_ps(p, mask, (__m512)v);
  } else {
    typename S::T tmp[kLanes];
    S::store(tmp, v);
    __m256i halves;
    std::memcpy(&halves, tmp, sizeof(halves));
    _mm256_mask_storeu_epi16(p, mask, halves);
  }
#else
  typename S::T tmp[kLanes];
  S::store(tmp, v);
  for (int64_t i = 0; i < count; ++i) p[i] = tmp[i];
#endif
}

// Calls body(lane_block_values..., offset, count) over a row in blocks of kLanes.
template <class S, class F>
inline void for_blocks(const typename S::T* p, int64_t n, float pad, F&& body) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) body(S::load(p + i), i, kLanes);
  if (i < n) body(load_part<S>(p + i, n - i, pad), i, n - i);
}

// A block of `count` <= kLanes entries: full vector loads and stores, or padded / prefix ones.
template <class S>
inline vf load_block(const typename S::T* p, int64_t count, float pad) {
  return count == kLanes ? S::load(p) : load_part<S>(p, count, pad);
}

template <class S>
inline void store_block(typename S::T* p, vf v, int64_t count) {
  if (count == kLanes)
    S::store(p, v);
  else
    store_part<S>(p, v, count);
}

// Sums in blocks. Within a block, four vector accumulators used in turn (a row's sum split
// 4 x kLanes ways, and consecutive adds do not wait on each other); after at most kBlockAdds
// vectors the block's partial sums go into float64 lanes. A float32 partial sum thus adds at most
// kBlockAdds / 4 + 3 terms whatever the length, so the rounding error of a sum does not grow with
// it (with the float32 accumulators alone it grew linearly: issue 14), for one conversion and add
// per kBlockAdds vectors. The loop is unrolled by four by hand: an accumulator picked by a
// running index kept the four in memory (a load and a store per add).
constexpr int kBlockAdds = 64;
constexpr int64_t kBlockEntries = int64_t(kBlockAdds) * kLanes;

// The sum over [0, n) of term(i, count), called in order for each block of kLanes entries at i
// (count = kLanes except for the last, partial one), as float64.
template <class F>
inline double blocked_sum(int64_t n, F&& term) {
  vd wide = vd{};
  for (int64_t start = 0; start < n; start += kBlockEntries) {
    const int64_t end = std::min(n, start + kBlockEntries);
    vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
    int64_t i = start;
    for (; i + 4 * kLanes <= end; i += 4 * kLanes) {
      a0 += term(i, int64_t(kLanes));
      a1 += term(i + kLanes, int64_t(kLanes));
      a2 += term(i + 2 * kLanes, int64_t(kLanes));
      a3 += term(i + 3 * kLanes, int64_t(kLanes));
    }
    for (; i + kLanes <= end; i += kLanes) a0 += term(i, int64_t(kLanes));
    if (i < end) a1 += term(i, end - i);
    wide += widen((a0 + a1) + (a2 + a3));
  }
  return hsum(wide);
}

// Two sums at once, blocked as blocked_sum: term(i, count, &a, &b) returns the block's two terms.
template <class F>
inline void blocked_sum2(int64_t n, double* first, double* second, F&& term) {
  vd wide_a = vd{}, wide_b = vd{};
  for (int64_t start = 0; start < n; start += kBlockEntries) {
    const int64_t end = std::min(n, start + kBlockEntries);
    vf a0 = vf{}, a1 = vf{}, b0 = vf{}, b1 = vf{};
    int64_t i = start;
    for (; i + 2 * kLanes <= end; i += 2 * kLanes) {
      vf ta, tb;
      term(i, int64_t(kLanes), &ta, &tb);
      a0 += ta;
      b0 += tb;
      term(i + kLanes, int64_t(kLanes), &ta, &tb);
      a1 += ta;
      b1 += tb;
    }
    for (; i < end; i += kLanes) {
      vf ta, tb;
      term(i, std::min<int64_t>(kLanes, end - i), &ta, &tb);
      a0 += ta;
      b0 += tb;
    }
    wide_a += widen(a0 + a1);
    wide_b += widen(b0 + b1);
  }
  *first = hsum(wide_a);
  *second = hsum(wide_b);
}

enum class RowKind { kNormal, kNaN, kEmpty, kPosInf };

template <class S>
bool has_nan(const typename S::T* x, int64_t n) {
  vi nan = vi{};
  for_blocks<S>(x, n, 0.0f, [&](vf v, int64_t, int64_t) { nan |= v != v; });
  return any(nan);
}

// Pass 1: the row maximum and which rule applies. The maximum skips NaN (a comparison with NaN
// is false); a NaN in a row whose maximum is finite is not looked for here: it makes the sum of
// the exponentials NaN, and with it every entry of the result. Rows whose maximum is infinite
// take other rules, so they are checked for NaN apart. With `copy` (16-bit storage), the row also
// goes to `copy` in float32, so that the later passes read it without converting it again.
template <class S>
RowKind scan_row(const typename S::T* x, int64_t n, float* row_max, float* copy = nullptr) {
  vf m0 = splat(-kInf), m1 = splat(-kInf);
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const vf a = S::load(x + i), b = S::load(x + i + kLanes);
    if (copy != nullptr) {
      F32::store(copy + i, a);
      F32::store(copy + i + kLanes, b);
    }
    m0 = a > m0 ? a : m0;
    m1 = b > m1 ? b : m1;
  }
  for_blocks<S>(x + i, n - i, -kInf, [&](vf v, int64_t j, int64_t count) {
    if (copy != nullptr) store_block<F32>(copy + i + j, v, count);
    m0 = v > m0 ? v : m0;
  });
  const float m = hmax(m0 > m1 ? m0 : m1);
  *row_max = m;
  if (m != -kInf && m != kInf) return RowKind::kNormal;
  if (has_nan<S>(x, n)) return RowKind::kNaN;
  return m == kInf ? RowKind::kPosInf : RowKind::kEmpty;
}

template <class S>
void fill_row(typename S::T* y, int64_t n, float value) {
  const typename S::T v = S::from_float(value);
  for (int64_t i = 0; i < n; ++i) y[i] = v;
}

// Rows holding +inf: the k +inf entries get `hit(k)`, the others `miss`.
template <class S>
void pos_inf_row(const typename S::T* x, typename S::T* y, int64_t n, bool log) {
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i) k += S::to_float(x[i]) == kInf;
  const float hit = log ? -std::log(float(k)) : 1.0f / float(k);
  const float miss = log ? -kInf : 0.0f;
  for (int64_t i = 0; i < n; ++i) y[i] = S::from_float(S::to_float(x[i]) == kInf ? hit : miss);
}

// How the pair passes split a row: entries [0, head) until the row is 64-byte aligned, then
// whole pairs [head, head + bulk) whose 64-byte loads and stores never cross a cache line (the
// softmax backward pass at 16384x1000 bfloat16, one thread: 3.5 ms unaligned, 3.3 aligned), then
// the rest. The edges go one vector (or less) at a time.
struct PairSplit {
  int64_t head, bulk;
};

template <class T>
PairSplit pair_split(const T* p, int64_t n) {
  const int64_t misaligned = int64_t(reinterpret_cast<uintptr_t>(p) % 64);
  const int64_t head =
      std::min<int64_t>(n, misaligned == 0 ? 0 : (64 - misaligned) / int64_t(sizeof(T)));
  return {head, (n - head) - (n - head) % (2 * kLanes)};
}

// Calls f(i, count) for the blocks of at most kLanes entries outside the split's pairs.
template <class F>
inline void for_edges(PairSplit split, int64_t n, F&& f) {
  for (int64_t i = 0; i < split.head; i += kLanes) f(i, std::min<int64_t>(kLanes, split.head - i));
  for (int64_t i = split.head + split.bulk; i < n; i += kLanes)
    f(i, std::min<int64_t>(kLanes, n - i));
}

// log_softmax's passes after the scan, for storage with load_pair / store_pair (bfloat16 with
// AVX512-BF16): both read the row in its 16-bit form, two vectors at a time, with no float32
// copy (for long rows the copy doubled what the passes read from L2: 256x32768, one thread,
// 3.5 ms with it, 3.0 without).
template <class S>
void log_forward_pairs(const typename S::T* x, typename S::T* y, int64_t n, float m,
                       const typename S::T* next) {
  const PairSplit split = pair_split(x, n);
  const typename S::T* xp = x + split.head;
  // blocked_sum over the pairs: term j covers entries [2j, 2j + 2 kLanes) after the head.
  double sum = blocked_sum(split.bulk / 2, [&](int64_t j, int64_t) {
    if (next != nullptr) __builtin_prefetch(next + 2 * j);
    vf even, odd;
    S::load_pair(xp + 2 * j, &even, &odd);
    return vexp(even - m) + vexp(odd - m);
  });
  for_edges(split, n, [&](int64_t i, int64_t count) {
    sum += hsum(widen(vexp(load_block<S>(x + i, count, -kInf) - m)));
  });
  const float log_sum = float(std::log(sum));
  for (int64_t i = split.head; i < split.head + split.bulk; i += 2 * kLanes) {
    vf even, odd;
    S::load_pair(x + i, &even, &odd);
    S::store_pair(y + i, (even - m) - log_sum, (odd - m) - log_sum);
  }
  for_edges(split, n, [&](int64_t i, int64_t count) {
    store_block<S>(y + i, (load_block<S>(x + i, count, -kInf) - m) - log_sum, count);
  });
}

// log_softmax's passes after the scan from a row of storage L (float32: the input itself or the
// 16-bit row's copy; else the 16-bit row, converted again in each pass) into y. From float32 the
// exponential pass also prefetches the output row for writing (see forward_row).
template <class L, class S>
void log_forward_passes(const typename L::T* x, typename S::T* y, int64_t n, float m,
                        const typename S::T* next) {
  constexpr bool kPrefetchOutput = std::is_same_v<typename L::T, float>;
  const double sum = blocked_sum(n, [&](int64_t i, int64_t count) {
    if (next != nullptr) __builtin_prefetch(next + i);
    if (kPrefetchOutput) __builtin_prefetch(y + i, 1);
    return vexp(load_block<L>(x + i, count, -kInf) - m);
  });
  const float log_sum = float(std::log(sum));
  for_blocks<L>(x, n, -kInf, [&](vf v, int64_t i, int64_t count) {
    store_block<S>(y + i, (v - m) - log_sum, count);
  });
}

// Whether the forward pass copies a row of 16-bit storage to float32 scratch (n floats) in its
// scan, for the later passes to read. softmax does (its exponentials go there too); log_softmax
// with load_pair never does (log_forward_pairs); otherwise log_softmax does unless the storage
// has kCheapLoad, the rows have at least 4096 entries and the array more than 2^21: rows that
// come from memory then run faster converted again in each pass (float16, one thread, copy /
// none, AVX512-BF16 build: 4096x4096 6.2 / 5.6 ms, 256x32768 3.3 / 3.0, 1024x4096 1.33-1.52 /
// 1.36; but 16384x1000 5.6 / 6.1, 8192x2048 5.4 / 5.9, 64x4096 0.076-0.085 / 0.084-0.091,
// 512x4096 0.65 / 0.66; the AVX2 build gains nothing either way).
template <class S, bool kLog>
bool forward_copies(int64_t n, int64_t entries) {
  if constexpr (std::is_same_v<typename S::T, float> || (kLog && S::kPairs))
    return false;
  else
    return !kLog || !S::kCheapLoad || n < 4096 || entries <= (int64_t(1) << 21);
}

// `scratch`: n floats where forward_copies says so, else unused (may be null).
template <class S, bool kLog>
JSOFTMAX_ROW_FUNCTION
void forward_row(const typename S::T* x, typename S::T* y, int64_t n, float* scratch,
                 const typename S::T* next) {
  constexpr bool kWide = std::is_same_v<typename S::T, float>;
  constexpr bool kLogPairs = kLog && S::kPairs;
  const bool copy = !kWide && !kLogPairs && scratch != nullptr;
  float m = 0.0f;
  switch (scan_row<S>(x, n, &m, copy ? scratch : nullptr)) {
    case RowKind::kNaN:
      return fill_row<S>(y, n, kNaN);
    case RowKind::kEmpty:
      return fill_row<S>(y, n, kLog ? -kInf : 0.0f);
    case RowKind::kPosInf:
      return pos_inf_row<S>(x, y, n, kLog);
    case RowKind::kNormal:
      break;
  }
  if constexpr (kLogPairs) {
    log_forward_pairs<S>(x, y, n, m, next);
  } else if constexpr (kLog) {
    if (kWide || !copy)
      log_forward_passes<S, S>(x, y, n, m, next);
    else
      log_forward_passes<F32, S>(scratch, y, n, m, next);
  } else {
    // While this row is computed from cache, the next one is fetched from memory: one prefetch
    // per block of the exp pass covers the next row's cache lines. Exponentials go to the output
    // when it is float32 (no double rounding), else to scratch; then the output row, which the
    // last pass writes, is prefetched for writing in the exp pass too: that pass is bound by its
    // arithmetic, the last one waited on each output line's fetch (one thread, AVX512-BF16
    // build, float16 1024x4096 1.38-1.66 -> 1.15-1.17 ms, 256x32768 3.77-3.85 -> 2.85-3.00,
    // 4096x4096 8.0-8.1 -> 5.1-5.5; bfloat16 alike; log_softmax from float32 rows: float32
    // 1024x4096 1.86-2.18 -> 1.36-1.57, other shapes 10-15% faster; results unchanged. From
    // 16-bit rows, log_softmax's passes were level or 3-5% slower with it, 4096x4096).
    const float* xf = kWide ? reinterpret_cast<const float*>(x) : scratch;
    float* e = kWide ? reinterpret_cast<float*>(y) : scratch;
    const double sum = blocked_sum(n, [&](int64_t i, int64_t count) {
      if (next != nullptr) __builtin_prefetch(next + i);
      if (!kWide) __builtin_prefetch(y + i, 1);
      const vf ev = vexp(load_block<F32>(xf + i, count, -kInf) - m);
      store_block<F32>(e + i, ev, count);
      return ev;
    });
    const float inv = float(1.0 / sum);
    for_blocks<F32>(e, n, 0.0f, [&](vf v, int64_t i, int64_t count) {
      store_block<S>(y + i, v * inv, count);
    });
  }
}

// softmax's backward pass for storage with load_pair / store_pair (bfloat16 with AVX512-BF16),
// two vectors of a row at a time; the edges of pair_split one vector at a time.
template <class S>
void softmax_backward_pairs(const typename S::T* y, const typename S::T* g, typename S::T* dx,
                            int64_t n) {
  const PairSplit split = pair_split(y, n);
  const typename S::T* yp = y + split.head;
  const typename S::T* gp = g + split.head;
  // blocked_sum over the pairs: term j covers entries [2j, 2j + 2 kLanes) after the head.
  double sum = blocked_sum(split.bulk / 2, [&](int64_t j, int64_t) {
    vf ye, yo, ge, go;
    S::load_pair(yp + 2 * j, &ye, &yo);
    S::load_pair(gp + 2 * j, &ge, &go);
    return ge * ye + go * yo;
  });
  for_edges(split, n, [&](int64_t i, int64_t count) {
    sum += hsum(widen(load_block<S>(g + i, count, 0.0f) * load_block<S>(y + i, count, 0.0f)));
  });
  const float total = float(sum);
  for (int64_t i = split.head; i < split.head + split.bulk; i += 2 * kLanes) {
    vf ye, yo, ge, go;
    S::load_pair(y + i, &ye, &yo);
    S::load_pair(g + i, &ge, &go);
    S::store_pair(dx + i, ye * (ge - total), yo * (go - total));
  }
  for_edges(split, n, [&](int64_t i, int64_t count) {
    const vf yv = load_block<S>(y + i, count, 0.0f);
    store_block<S>(dx + i, yv * (load_block<S>(g + i, count, 0.0f) - total), count);
  });
}

// log_softmax with 16-bit storage: the first pass also copies y and g to `scratch` (2n floats) in
// float32, which the second pass reads instead of converting them again (for softmax, whose
// passes do less arithmetic, the extra stores cost more than the conversions they save).
// The next row is prefetched except for softmax with 16-bit storage, whose second pass is short
// enough that the prefetches slowed it (bf16 1024x4096, one thread: 1.49 ms with them, 1.20
// without; float32 and log_softmax gained from them).
template <class S, bool kLog>
JSOFTMAX_ROW_FUNCTION
void backward_row(const typename S::T* y, const typename S::T* g, typename S::T* dx, int64_t n,
                  float* scratch, const typename S::T* next_y, const typename S::T* next_g) {
  constexpr bool kWide = std::is_same_v<typename S::T, float>;
  if constexpr (!kLog && S::kPairs) return softmax_backward_pairs<S>(y, g, dx, n);
  constexpr bool kCopy = kLog && !kWide;
  constexpr bool kPrefetch = kLog || kWide;
  float* ys = scratch;
  float* gs = kCopy ? scratch + n : nullptr;
  const float y_pad = kLog ? -kInf : 0.0f;
  const float total = float(blocked_sum(n, [&](int64_t i, int64_t count) {
    const vf yv = load_block<S>(y + i, count, y_pad);
    const vf gv = load_block<S>(g + i, count, 0.0f);
    if constexpr (kCopy) {
      store_block<F32>(ys + i, yv, count);
      store_block<F32>(gs + i, gv, count);
    }
    if constexpr (kLog)
      return (yv == -kInf) ? splat(0.0f) : gv;
    else
      return gv * yv;
  }));
  for (int64_t i = 0; i < n; i += kLanes) {
    if (kPrefetch && next_y != nullptr) {  // the next row, from memory, while this one is cached
      __builtin_prefetch(next_y + i);
      __builtin_prefetch(next_g + i);
    }
    const int64_t count = std::min<int64_t>(kLanes, n - i);
    vf yv, gv;
    if constexpr (kCopy) {
      yv = load_block<F32>(ys + i, count, y_pad);
      gv = load_block<F32>(gs + i, count, 0.0f);
    } else {
      yv = load_block<S>(y + i, count, y_pad);
      gv = load_block<S>(g + i, count, 0.0f);
    }
    vf out;
    if constexpr (kLog)
      out = ((yv == -kInf) ? splat(0.0f) : gv) - vexp(yv) * total;
    else
      out = yv * (gv - total);
    store_block<S>(dx + i, out, count);
  }
}

// The backward pass from the input x rather than the output (what reverse mode saves on the
// kernel path: under `jit(vjp)` the forward kernel then does not run at all when only the
// gradient is used). The row is read from memory once per operand and its passes run from cache:
// the maximum, the exponentials (into dx, or into `scratch` for 16-bit storage) and their sum,
// then the backward pass's reduction and output with y = e / sum formed on the fly. Rows with an
// infinite maximum or a NaN take the forward then the backward row functions, in place, so every
// rule is the one the two kernels apply. `scratch`: 3n floats for 16-bit storage, else unused.
template <class S, bool kLog>
JSOFTMAX_ROW_FUNCTION
void backward_from_input_row(const typename S::T* x, const typename S::T* g, typename S::T* dx,
                             int64_t n, float* scratch, const typename S::T* next_x,
                             const typename S::T* next_g) {
  constexpr bool kWide = std::is_same_v<typename S::T, float>;
  float m = 0.0f;
  if (scan_row<S>(x, n, &m, kWide ? nullptr : scratch) != RowKind::kNormal) {
    forward_row<S, kLog>(x, dx, n, scratch, nullptr);
    return backward_row<S, kLog>(dx, g, dx, n, kWide ? nullptr : scratch + n, nullptr, nullptr);
  }
  auto prefetch_next = [&](int64_t i) {
    if (next_x != nullptr) {
      __builtin_prefetch(next_x + i);
      __builtin_prefetch(next_g + i);
    }
  };
  // xf: the row in float32; e: its exponentials (softmax), overwriting the 16-bit row's copy.
  const float* xf = kWide ? reinterpret_cast<const float*>(x) : scratch;
  if constexpr (kLog) {
    // dx = g - softmax(x) * sum(g), g counted only where the stored y = (x - m) - log(sum)
    // would be > -inf, as the output-based pass counts it (x - m or its rounding to 16 bits
    // overflows to -inf for finite x far below m). The exponentials are kept (in dx, or in
    // scratch after the row's float32 copy) and give softmax(x) = e * (1 / sum) in the last
    // pass, without a second exp. For float32, y is -inf exactly where x - m is (log(sum) is
    // at most 17 for any length up to 2^24: subtracting it cannot overflow), so sum(g) comes
    // with sum(e); for 16-bit storage the threshold needs log(sum), one pass more.
    float* e = kWide ? reinterpret_cast<float*>(dx) : scratch + n;
    double sum = 0.0, kept = 0.0;
    auto exp_pass = [&](int64_t i, int64_t count) {
      prefetch_next(i);
      const vf d = load_block<F32>(xf + i, count, -kInf) - m;
      const vf ev = vexp(d);
      store_block<F32>(e + i, ev, count);
      return std::make_pair(d, ev);
    };
    if constexpr (kWide) {
      blocked_sum2(n, &sum, &kept, [&](int64_t i, int64_t count, vf* ev_out, vf* g_out) {
        const auto [d, ev] = exp_pass(i, count);
        *ev_out = ev;
        *g_out = (d == -kInf) ? splat(0.0f) : load_block<S>(g + i, count, 0.0f);
      });
    } else {
      sum = blocked_sum(n, [&](int64_t i, int64_t count) { return exp_pass(i, count).second; });
    }
    const float log_sum = float(std::log(sum));
    const float inv = float(1.0 / sum);
    if constexpr (!kWide) {
      kept = blocked_sum(n, [&](int64_t i, int64_t count) {
        const vf yv = (load_block<F32>(xf + i, count, -kInf) - m) - log_sum;
        return (yv <= S::kNegOverflow) ? splat(0.0f) : load_block<S>(g + i, count, 0.0f);
      });
    }
    const float total = float(kept);
    for_blocks<F32>(xf, n, -kInf, [&](vf v, int64_t i, int64_t count) {
      const vf gv = load_block<S>(g + i, count, 0.0f);
      const vf yv = (v - m) - log_sum;
      const vf probs = load_block<F32>(e + i, count, 0.0f) * inv;
      const vf out = ((yv <= S::kNegOverflow) ? splat(0.0f) : gv) - probs * total;
      store_block<S>(dx + i, out, count);
    });
  } else {
    // dx = y * (g - sum(g * y)), y = e * (1 / sum(e)): sum(e) and sum(g * e) in one pass.
    float* e = kWide ? reinterpret_cast<float*>(dx) : scratch;
    double sum = 0.0, dot = 0.0;
    blocked_sum2(n, &sum, &dot, [&](int64_t i, int64_t count, vf* ev_out, vf* ge_out) {
      prefetch_next(i);
      const vf ev = vexp(load_block<F32>(xf + i, count, -kInf) - m);
      store_block<F32>(e + i, ev, count);
      *ev_out = ev;
      *ge_out = load_block<S>(g + i, count, 0.0f) * ev;
    });
    const float inv = float(1.0 / sum);
    const float total = float(dot / sum);
    for_blocks<F32>(e, n, 0.0f, [&](vf v, int64_t i, int64_t count) {
      const vf yv = v * inv;
      store_block<S>(dx + i, yv * (load_block<S>(g + i, count, 0.0f) - total), count);
    });
  }
}

// cross_entropy over rows (integer labels; label smoothing without class weights;
// _cross_entropy.py decides).
//
// Forward: each row's statistics (shift, log_normalizer, shifted_sum) in float32, by the XLA
// path's exact rules (_formula.shifted_input and exp_sum): shift = the row maximum,
// log_normalizer = log(sum(exp(x - shift))) with the sum reduced from FLT_MIN, shifted_sum =
// sum(x - shift) (label smoothing's term; +inf entries count 0). A row of nothing but -inf gets
// the shift of the storage type's lowest finite value, log(FLT_MIN) and -inf; a row holding +inf
// (and no NaN) gets +inf, log(k) for its k +inf entries, and -inf unless every entry is +inf
// (then 0); a row holding NaN gets NaN for all three.
template <class S>
JSOFTMAX_ROW_FUNCTION
void ce_stats_row(const typename S::T* x, int64_t n, float* scratch, float* out,
                  const typename S::T* next) {
  constexpr bool kWide = std::is_same_v<typename S::T, float>;
  float m = 0.0f;
  switch (scan_row<S>(x, n, &m, kWide ? nullptr : scratch)) {
    case RowKind::kNaN:
      out[0] = out[1] = out[2] = kNaN;
      return;
    case RowKind::kEmpty:
      out[0] = S::kLowest;
      out[1] = float(std::log(double(std::numeric_limits<float>::min())));
      out[2] = -kInf;
      return;
    case RowKind::kPosInf: {
      int64_t k = 0;
      for (int64_t i = 0; i < n; ++i) k += S::to_float(x[i]) == kInf;
      out[0] = kInf;
      out[1] = float(std::log(double(k)));
      out[2] = k == n ? 0.0f : -kInf;
      return;
    }
    case RowKind::kNormal:
      break;
  }
  const float* xf = kWide ? reinterpret_cast<const float*>(x) : scratch;
  vi iota;
  for (int i = 0; i < kLanes; ++i) iota[i] = i;
  double sum = 0.0, shifted_sum = 0.0;
  blocked_sum2(n, &sum, &shifted_sum, [&](int64_t i, int64_t count, vf* e_out, vf* d_out) {
    if (next != nullptr) __builtin_prefetch(next + i);
    const vf d = load_block<F32>(xf + i, count, -kInf) - m;
    *e_out = vexp(d);
    *d_out = count == kLanes ? d : ((iota < int32_t(count)) ? d : splat(0.0f));
  });
  // A NaN among finite entries makes the sum NaN: the row's shift is NaN too, as the XLA
  // path's maximum propagates it.
  const bool nan = sum != sum;
  out[0] = nan ? kNaN : m;
  out[1] = float(std::log(sum));
  out[2] = nan ? kNaN : float(shifted_sum);
}

// Backward, the gradient of row r's loss times its cotangent:
// dx = scale * (p - label_mass * onehot(code) - uniform), p = exp(((x == +inf) ? 0 : x - shift)
// - log_normalizer); 0 at -inf logits (masked classes, constants). `scale` is the cotangent times
// the row's target mass; code -1 marks an ignored row (all 0, even at NaN logits), -2 a label out
// of range (all NaN). `stats` holds shift and log_normalizer.
template <class S>
JSOFTMAX_ROW_FUNCTION
void ce_backward_row(const typename S::T* x, const float* stats, float scale, int32_t code,
                     float label_mass, float uniform, typename S::T* dx, int64_t n,
                     const typename S::T* next) {
  if (code < 0) return fill_row<S>(dx, n, code == -1 ? 0.0f : kNaN);
  const float shift = stats[0], log_normalizer = stats[1];
  vi iota;
  for (int i = 0; i < kLanes; ++i) iota[i] = i;
  for_blocks<S>(x, n, -kInf, [&](vf v, int64_t i, int64_t count) {
    if (next != nullptr) __builtin_prefetch(next + i);
    const vf shifted = (v == kInf) ? splat(0.0f) : v - shift;
    vf probs = vexp(shifted - log_normalizer);
    // p - 1 is exact for p >= 1/2 (no label smoothing).
    probs = ((iota + int32_t(i)) == code) ? probs - label_mass : probs;
    store_block<S>(dx + i, (v == -kInf) ? splat(0.0f) : scale * (probs - uniform), count);
  });
}

// Whether the environment variable `name` leaves a switch on: unset or anything but "0".
bool switch_on(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr || std::strcmp(value, "0") != 0;
}

// Whether helper tasks move off the calling thread's CPU (see parallel_rows).
// JSOFTMAX_CPU_SPREAD=0, read once per process, turns it off.
bool spread_wanted() {
  static const bool wanted = switch_on("JSOFTMAX_CPU_SPREAD");
  return wanted;
}

// The CPU the calling thread runs on, or -1 where that is not known (or not wanted).
int current_cpu() {
#if defined(__linux__)
  return sched_getcpu();
#else
  return -1;
#endif
}

// Runs a helper task's share of parallel_rows off the CPU that the calling thread runs on. When
// the caller wakes a pool thread, Linux may queue it on the caller's own CPU (the CPU the
// thread last ran on, or the waker's) although another is idle, and it can stay there for the
// whole call: two threads then share one core. On a 2-core machine (jax's CPU client between
// Python calls) this happened to whole runs of calls: bf16 16384x1000 softmax took 5.8 ms a call,
// the one-core time, instead of 3.0 (NOTES, session 9). A helper that finds itself on the caller's
// CPU narrows its own affinity to the other allowed CPUs, which moves it at once, and restores the
// mask when its share is done; pool threads on other CPUs are left alone.
template <class F>
void run_off_cpu(int caller_cpu, F&& work) {
#if defined(__linux__)
  cpu_set_t allowed;
  if (caller_cpu >= 0 && caller_cpu < CPU_SETSIZE && sched_getcpu() == caller_cpu &&
      sched_getaffinity(0, sizeof(allowed), &allowed) == 0 && CPU_ISSET(caller_cpu, &allowed) &&
      CPU_COUNT(&allowed) > 1) {
    cpu_set_t others = allowed;
    CPU_CLR(caller_cpu, &others);
    if (sched_setaffinity(0, sizeof(others), &others) == 0) {
      work();
      sched_setaffinity(0, sizeof(allowed), &allowed);
      return;
    }
  }
#else
  (void)caller_cpu;
#endif
  work();
}

// Splits rows [0, rows) into chunks taken from a shared counter by the calling thread and by
// tasks on XLA's pool. The caller alone can finish every chunk, so a busy pool only costs
// parallelism; a task that starts after all chunks are taken touches nothing but the counters.
// After scheduling the tasks the caller yields once, so that a task queued on its own CPU starts
// (and moves away: run_off_cpu) before the caller takes the first chunk.
template <class F>
void parallel_rows(ffi::ThreadPool& pool, int64_t rows, int64_t row_len, F&& body) {
  const int64_t work = rows * std::max<int64_t>(row_len, 1);
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  threads = std::min<int64_t>(threads, std::max<int64_t>(1, work / 16384));
  threads = std::min<int64_t>(threads, rows);
  if (threads <= 1) {
    body(0, rows);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  const int64_t chunks = std::min<int64_t>(rows, threads * 8);
  auto run = [state, chunks, rows, &body]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      body(c * rows / chunks, (c + 1) * rows / chunks);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int caller_cpu = spread_wanted() ? current_cpu() : -1;
  for (int64_t t = 1; t < threads; ++t)
    pool.Schedule([run, caller_cpu]() { run_off_cpu(caller_cpu, run); });
  if (caller_cpu >= 0) std::this_thread::yield();
  run();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// Output buffers arrive unbacked and every 4 KiB page faults on first write, which can cost more
// than the softmax itself; transparent huge pages on the 2 MiB-aligned interior of a large output
// cut that (advice only: no value changes, ignored where THP is off). JSOFTMAX_CPU_HUGE_PAGES=0,
// read once per process, turns it off.
bool huge_pages_wanted() {
  static const bool wanted = switch_on("JSOFTMAX_CPU_HUGE_PAGES");
  return wanted;
}

void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!huge_pages_wanted()) return;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Columns: the array viewed as [outer, n, inner], slices running along n at stride `inner`. One
// unit of work is up to kGroup lane blocks (kGroup * kLanes = 128 neighbouring slices) of one
// outer index, so each step down the slices reads one contiguous stretch of a row; each lane is
// one slice and the row rules are applied lane by lane, with the XLA path's formula (shift by the
// maximum when finite, +inf slices to their limit, NaN slices NaN, empty sums replaced by 1).
// Sums are blocked as in blocked_sum: four float32 accumulators per lane (j % 4) over kBlockAdds
// steps, then float64 lanes.
constexpr int kGroup = 128 / kLanes;

struct ColumnGroup {
  int64_t n, inner, width;  // slice length, stride, slices in this group (<= kGroup * kLanes)
  int blocks() const { return int((width + kLanes - 1) / kLanes); }
  int64_t lanes(int b) const { return std::min<int64_t>(kLanes, width - int64_t(b) * kLanes); }
};

// sum[b] = the sum over j of term(j, b), per lane, blocked (float32 over kBlockAdds steps of j,
// four accumulators, then float64).
template <class F>
inline void blocked_column_sums(const ColumnGroup& c, vd (&sum)[kGroup], F&& term) {
  const int nb = c.blocks();
  vf acc[4][kGroup];
  for (int b = 0; b < nb; ++b) sum[b] = vd{};
  for (int64_t j0 = 0; j0 < c.n; j0 += kBlockAdds) {
    for (int b = 0; b < nb; ++b)
      for (auto& a : acc) a[b] = vf{};
    const int64_t j1 = std::min<int64_t>(c.n, j0 + kBlockAdds);
    for (int64_t j = j0; j < j1; ++j)
      for (int b = 0; b < nb; ++b) acc[j & 3][b] += term(j, b);
    for (int b = 0; b < nb; ++b)
      sum[b] += widen((acc[0][b] + acc[1][b]) + (acc[2][b] + acc[3][b]));
  }
}

template <class S, bool kLog>
JSOFTMAX_ROW_FUNCTION
void forward_columns(const typename S::T* x, typename S::T* y, const ColumnGroup& c) {
  const int nb = c.blocks();
  vf m[kGroup], shift[kGroup];
  vd sum[kGroup];
  vi nan[kGroup], pos_inf[kGroup];
  for (int b = 0; b < nb; ++b) {
    m[b] = splat(-kInf);
    nan[b] = vi{};
  }
  for (int64_t j = 0; j < c.n; ++j)
    for (int b = 0; b < nb; ++b) {
      const vf v = load_block<S>(x + j * c.inner + b * kLanes, c.lanes(b), -kInf);
      nan[b] |= v != v;
      m[b] = v > m[b] ? v : m[b];
    }
  for (int b = 0; b < nb; ++b) {
    pos_inf[b] = m[b] == kInf;
    shift[b] = (m[b] == m[b]) & (m[b] != kInf) & (m[b] != -kInf) ? m[b] : splat(0.0f);
  }
  auto shifted = [&](vf v, int b) {
    return pos_inf[b] ? ((v == kInf) ? splat(0.0f) : splat(-kInf)) : v - shift[b];
  };
  auto load = [&](int64_t j, int b) {
    return shifted(load_block<S>(x + j * c.inner + b * kLanes, c.lanes(b), -kInf), b);
  };
  blocked_column_sums(c, sum, [&](int64_t j, int b) { return vexp(load(j, b)); });
  for (int b = 0; b < nb; ++b) sum[b] = sum[b] == 0.0 ? vd{} + 1.0 : sum[b];
  const vf nan_lanes = splat(kNaN);
  if constexpr (kLog) {
    vf log_sum[kGroup];
    for (int b = 0; b < nb; ++b)
      for (int i = 0; i < kLanes; ++i) log_sum[b][i] = float(std::log(sum[b][i]));
    for (int64_t j = 0; j < c.n; ++j)
      for (int b = 0; b < nb; ++b) {
        const vf out = load(j, b) - log_sum[b];
        store_block<S>(y + j * c.inner + b * kLanes, nan[b] ? nan_lanes : out, c.lanes(b));
      }
  } else {
    vf inv[kGroup];
    for (int b = 0; b < nb; ++b) inv[b] = narrow(1.0 / sum[b]);
    // The exponentials again rather than from a scratch copy: a group spans up to 128 slices,
    // and the input plus a float32 copy of its exponentials would not stay in L2.
    for (int64_t j = 0; j < c.n; ++j)
      for (int b = 0; b < nb; ++b) {
        const vf e = vexp(load(j, b));
        store_block<S>(y + j * c.inner + b * kLanes, nan[b] ? nan_lanes : e * inv[b],
                       c.lanes(b));
      }
  }
}

template <class S, bool kLog>
JSOFTMAX_ROW_FUNCTION
void backward_columns(const typename S::T* y, const typename S::T* g, typename S::T* dx,
                      const ColumnGroup& c) {
  const int nb = c.blocks();
  const float y_pad = kLog ? -kInf : 0.0f;
  vf total[kGroup];
  vd wide_total[kGroup];
  blocked_column_sums(c, wide_total, [&](int64_t j, int b) {
    const int64_t at = j * c.inner + b * kLanes;
    const vf yv = load_block<S>(y + at, c.lanes(b), y_pad);
    const vf gv = load_block<S>(g + at, c.lanes(b), 0.0f);
    if constexpr (kLog)
      return (yv == -kInf) ? splat(0.0f) : gv;
    else
      return gv * yv;
  });
  for (int b = 0; b < nb; ++b) total[b] = narrow(wide_total[b]);
  for (int64_t j = 0; j < c.n; ++j)
    for (int b = 0; b < nb; ++b) {
      const int64_t at = j * c.inner + b * kLanes;
      const vf yv = load_block<S>(y + at, c.lanes(b), y_pad);
      const vf gv = load_block<S>(g + at, c.lanes(b), 0.0f);
      vf out;
      if constexpr (kLog)
        out = ((yv == -kInf) ? splat(0.0f) : gv) - vexp(yv) * total[b];
      else
        out = yv * (gv - total[b]);
      store_block<S>(dx + at, out, c.lanes(b));
    }
}

// The slice layout of an operand: rows of `n` (columns = false: the reduced axes are trailing), or
// [outer, n, inner] (columns = true: the last two dimensions are n and inner).
struct Layout {
  int64_t units = 0;  // independent pieces of work
  int64_t n = 0;      // slice length
  int64_t inner = 1;  // stride between a slice's entries
  int64_t groups = 1;  // column groups per outer index
  int64_t unit_size = 0;  // entries per unit, for the thread split

  // The column group of unit u: its offset in the array and its shape.
  ColumnGroup group(int64_t u, int64_t* offset) const {
    constexpr int64_t kWidth = kGroup * kLanes;
    const int64_t outer = u / groups, first = (u % groups) * kWidth;
    *offset = outer * n * inner + first;
    return ColumnGroup{n, inner, std::min<int64_t>(kWidth, inner - first)};
  }
};

Layout layout_of(const ffi::AnyBuffer& b, bool columns) {
  const auto dims = b.dimensions();
  const int64_t rank = dims.size();
  Layout l;
  l.n = rank == 0 ? 1 : dims[rank - 1];
  if (columns) {
    l.inner = l.n;
    l.n = rank >= 2 ? dims[rank - 2] : 1;
    l.groups = (l.inner + kGroup * kLanes - 1) / (kGroup * kLanes);
  }
  const int64_t slices = l.n * l.inner == 0 ? 0 : int64_t(b.element_count()) / (l.n * l.inner);
  l.units = slices * l.groups;
  l.unit_size = l.n * std::min<int64_t>(l.inner, kGroup * kLanes);
  return l;
}

template <class F>
ffi::Error with_storage(ffi::DataType type, F&& f) {
  switch (type) {
    case ffi::DataType::F32:
      f(F32{});
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      f(BF16{});
      return ffi::Error::Success();
    case ffi::DataType::F16:
      f(F16{});
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("jsoftmax CPU kernel: float32, bfloat16 or float16 only");
  }
}

template <bool kLog, bool kColumns>
ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  const Layout l = layout_of(x, kColumns);
  if (l.units == 0) return ffi::Error::Success();
  return with_storage(x.element_type(), [&](auto storage) {
    using S = decltype(storage);
    using T = typename S::T;
    const T* xp = reinterpret_cast<const T*>(x.untyped_data());
    T* yp = reinterpret_cast<T*>(y->untyped_data());
    advise_huge_pages(yp, y->size_bytes());
    parallel_rows(pool, l.units, l.unit_size, [&](int64_t u0, int64_t u1) {
      if constexpr (kColumns) {
        for (int64_t u = u0; u < u1; ++u) {
          int64_t offset;
          const ColumnGroup c = l.group(u, &offset);
          forward_columns<S, kLog>(xp + offset, yp + offset, c);
        }
      } else {
        const bool copies = forward_copies<S, kLog>(l.n, l.units * l.n);
        std::vector<float> scratch(copies ? l.n : 0);
        for (int64_t r = u0; r < u1; ++r)
          forward_row<S, kLog>(xp + r * l.n, yp + r * l.n, l.n, copies ? scratch.data() : nullptr,
                               r + 1 < u1 ? xp + (r + 1) * l.n : nullptr);
      }
    });
  });
}

// kFromInput: the first operand is the input x (backward_from_input_row), else the output y.
template <bool kLog, bool kColumns, bool kFromInput = false>
ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer y, ffi::AnyBuffer g,
                    ffi::Result<ffi::AnyBuffer> dx) {
  if (y.element_type() != g.element_type())
    return ffi::Error::InvalidArgument(
        "jsoftmax CPU kernel: the operand and cotangent dtypes differ");
  const Layout l = layout_of(y, kColumns);
  if (l.units == 0) return ffi::Error::Success();
  return with_storage(y.element_type(), [&](auto storage) {
    using S = decltype(storage);
    using T = typename S::T;
    const T* yp = reinterpret_cast<const T*>(y.untyped_data());
    const T* gp = reinterpret_cast<const T*>(g.untyped_data());
    T* dp = reinterpret_cast<T*>(dx->untyped_data());
    advise_huge_pages(dp, dx->size_bytes());
    parallel_rows(pool, l.units, l.unit_size, [&](int64_t u0, int64_t u1) {
      constexpr bool kNarrow = !kColumns && !std::is_same_v<T, float>;
      std::vector<float> scratch(kNarrow && (kLog || kFromInput) ? (kFromInput ? 3 : 2) * l.n : 0);
      for (int64_t u = u0; u < u1; ++u) {
        if constexpr (kColumns) {
          int64_t offset;
          const ColumnGroup c = l.group(u, &offset);
          if constexpr (kFromInput) {  // in place: the forward pass into dx, then dx as y
            forward_columns<S, kLog>(yp + offset, dp + offset, c);
            backward_columns<S, kLog>(dp + offset, gp + offset, dp + offset, c);
          } else {
            backward_columns<S, kLog>(yp + offset, gp + offset, dp + offset, c);
          }
        } else if constexpr (kFromInput) {
          const bool more = u + 1 < u1;
          backward_from_input_row<S, kLog>(yp + u * l.n, gp + u * l.n, dp + u * l.n, l.n,
                                           scratch.data(), more ? yp + (u + 1) * l.n : nullptr,
                                           more ? gp + (u + 1) * l.n : nullptr);
        } else {
          const bool more = u + 1 < u1;
          backward_row<S, kLog>(yp + u * l.n, gp + u * l.n, dp + u * l.n, l.n, scratch.data(),
                                more ? yp + (u + 1) * l.n : nullptr,
                                more ? gp + (u + 1) * l.n : nullptr);
        }
      }
    });
  });
}

// cross_entropy: x [..., n] -> stats [..., 3] (float32 shift, log_normalizer, shifted_sum), and
// (x, stats [..., 2] (shift, log_normalizer), scale [...], code [...]) -> dx [..., n], with the
// attributes label_mass and uniform.
ffi::Error CrossEntropyStats(ffi::ThreadPool pool, ffi::AnyBuffer x,
                             ffi::Result<ffi::Buffer<ffi::F32>> stats) {
  const Layout l = layout_of(x, false);
  if (l.units == 0) return ffi::Error::Success();
  if (int64_t(stats->element_count()) != 3 * l.units)
    return ffi::Error::InvalidArgument("jsoftmax CPU kernel: statistics of the wrong shape");
  return with_storage(x.element_type(), [&](auto storage) {
    using S = decltype(storage);
    using T = typename S::T;
    const T* xp = reinterpret_cast<const T*>(x.untyped_data());
    float* sp = stats->typed_data();
    parallel_rows(pool, l.units, l.n, [&](int64_t r0, int64_t r1) {
      std::vector<float> scratch(std::is_same_v<T, float> ? 0 : l.n);
      for (int64_t r = r0; r < r1; ++r)
        ce_stats_row<S>(xp + r * l.n, l.n, scratch.data(), sp + 3 * r,
                        r + 1 < r1 ? xp + (r + 1) * l.n : nullptr);
    });
  });
}

ffi::Error CrossEntropyBackward(ffi::ThreadPool pool, ffi::AnyBuffer x,
                                ffi::Buffer<ffi::F32> stats, ffi::Buffer<ffi::F32> scale,
                                ffi::Buffer<ffi::S32> code, float label_mass, float uniform,
                                ffi::Result<ffi::AnyBuffer> dx) {
  const Layout l = layout_of(x, false);
  if (l.units == 0) return ffi::Error::Success();
  if (int64_t(stats.element_count()) != 2 * l.units ||
      int64_t(scale.element_count()) != l.units || int64_t(code.element_count()) != l.units)
    return ffi::Error::InvalidArgument("jsoftmax CPU kernel: per-row operands of the wrong shape");
  return with_storage(x.element_type(), [&](auto storage) {
    using S = decltype(storage);
    using T = typename S::T;
    const T* xp = reinterpret_cast<const T*>(x.untyped_data());
    const float* sp = stats.typed_data();
    const float* cp = scale.typed_data();
    const int32_t* kp = code.typed_data();
    T* dp = reinterpret_cast<T*>(dx->untyped_data());
    advise_huge_pages(dp, dx->size_bytes());
    parallel_rows(pool, l.units, l.n, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        ce_backward_row<S>(xp + r * l.n, sp + 2 * r, cp[r], kp[r], label_mass, uniform,
                           dp + r * l.n, l.n,
                           r + 1 < r1 ? xp + (r + 1) * l.n : nullptr);
    });
  });
}

}  // namespace

// Only the handlers and the two functions below are exported (the libraries build with hidden
// visibility, so variants loaded side by side share no symbols).
#define JSOFTMAX_EXPORT extern "C" __attribute__((visibility("default")))
#define JSOFTMAX_FORWARD(name, impl)                                           \
  JSOFTMAX_EXPORT XLA_FFI_Error* name(XLA_FFI_CallFrame* call_frame);          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl,                                    \
                                ffi::Ffi::Bind()                               \
                                    .Ctx<ffi::ThreadPool>()                    \
                                    .Arg<ffi::AnyBuffer>()                     \
                                    .Ret<ffi::AnyBuffer>())
#define JSOFTMAX_BACKWARD(name, impl)                                          \
  JSOFTMAX_EXPORT XLA_FFI_Error* name(XLA_FFI_CallFrame* call_frame);          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl,                                    \
                                ffi::Ffi::Bind()                               \
                                    .Ctx<ffi::ThreadPool>()                    \
                                    .Arg<ffi::AnyBuffer>()                     \
                                    .Arg<ffi::AnyBuffer>()                     \
                                    .Ret<ffi::AnyBuffer>())

#define JSOFTMAX_STRING_(x) #x
#define JSOFTMAX_STRING(x) JSOFTMAX_STRING_(x)
#ifndef JSOFTMAX_ISA
#error "build with -DJSOFTMAX_ISA=<variant> (CMakeLists.txt does)"
#endif

// The instruction set this library was compiled for.
JSOFTMAX_EXPORT const char* jsoftmax_isa() { return JSOFTMAX_STRING(JSOFTMAX_ISA); }

// The best variant this CPU (and its OS) can run; only ever called in the generic library, whose
// code runs everywhere. __builtin_cpu_supports also checks that the OS saves the wider registers.
JSOFTMAX_EXPORT const char* jsoftmax_cpu_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return "avx512bf16";
  if (avx512) return "avx512";
  if (avx2) return "avx2";
#endif
  return "generic";
}

namespace {
// Rows: the reduced axes are the trailing ones, operands arrive as [..., n].
constexpr auto softmax_fwd = Forward<false, false>;
constexpr auto log_softmax_fwd = Forward<true, false>;
constexpr auto softmax_bwd = Backward<false, false>;
constexpr auto log_softmax_bwd = Backward<true, false>;
// Columns: a block of reduced axes with axes after it, operands arrive as [..., n, inner].
constexpr auto softmax_fwd_columns = Forward<false, true>;
constexpr auto log_softmax_fwd_columns = Forward<true, true>;
constexpr auto softmax_bwd_columns = Backward<false, true>;
constexpr auto log_softmax_bwd_columns = Backward<true, true>;
// The backward pass from the input (first operand x), rows and columns.
constexpr auto softmax_bwd_from_input = Backward<false, false, true>;
constexpr auto log_softmax_bwd_from_input = Backward<true, false, true>;
constexpr auto softmax_bwd_from_input_columns = Backward<false, true, true>;
constexpr auto log_softmax_bwd_from_input_columns = Backward<true, true, true>;
}  // namespace

JSOFTMAX_FORWARD(jsoftmax_softmax_fwd, softmax_fwd);
JSOFTMAX_FORWARD(jsoftmax_log_softmax_fwd, log_softmax_fwd);
JSOFTMAX_BACKWARD(jsoftmax_softmax_bwd, softmax_bwd);
JSOFTMAX_BACKWARD(jsoftmax_log_softmax_bwd, log_softmax_bwd);
JSOFTMAX_FORWARD(jsoftmax_softmax_fwd_columns, softmax_fwd_columns);
JSOFTMAX_FORWARD(jsoftmax_log_softmax_fwd_columns, log_softmax_fwd_columns);
JSOFTMAX_BACKWARD(jsoftmax_softmax_bwd_columns, softmax_bwd_columns);
JSOFTMAX_BACKWARD(jsoftmax_log_softmax_bwd_columns, log_softmax_bwd_columns);
JSOFTMAX_BACKWARD(jsoftmax_softmax_bwd_from_input, softmax_bwd_from_input);
JSOFTMAX_BACKWARD(jsoftmax_log_softmax_bwd_from_input, log_softmax_bwd_from_input);
JSOFTMAX_BACKWARD(jsoftmax_softmax_bwd_from_input_columns, softmax_bwd_from_input_columns);
JSOFTMAX_BACKWARD(jsoftmax_log_softmax_bwd_from_input_columns,
                  log_softmax_bwd_from_input_columns);
JSOFTMAX_EXPORT XLA_FFI_Error* jsoftmax_cross_entropy_stats(XLA_FFI_CallFrame* call_frame);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jsoftmax_cross_entropy_stats, CrossEntropyStats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
JSOFTMAX_EXPORT XLA_FFI_Error* jsoftmax_cross_entropy_bwd(XLA_FFI_CallFrame* call_frame);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jsoftmax_cross_entropy_bwd, CrossEntropyBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("label_mass")
                                  .Attr<float>("uniform")
                                  .Ret<ffi::AnyBuffer>());
