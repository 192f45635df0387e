// Matrix products on the CPU for the ``bitmask`` layout (docs/format.md): one presence bit per element (bit j & 7
// of byte j >> 3 of row i), the non-zeros row by row in ``values`` from ``row_ptr[i]``.
//
// bitmask_linear: y = F0·(F1·(…·x)) for a chain of bitmask factors (a DSF layer A·(B·x) is one call); the fp32
//   intermediates stay in a small buffer that is still in cache when the next factor reads it.
// dense_linear: y = x·Wᵀ for a dense fp16/bf16/fp32 W, or int8 W with one scale per row (a tied lm_head kept in
//   16 or 8 bits), fp32 in and out.
//
// int8 values carry one scale per row (docs/format.md, "Quantized tensors"): a row's dot products are
// accumulated over the raw int8 values in fp32 and multiplied by the row's scale once at the end. float8 (e4m3fn)
// codes also have row scales; int4 codes (two per byte, low nibble first, one stream over the factor) have one scale
// per group of group_size columns (a multiple of 64). A row of either is first decoded into an L1-resident buffer by
// a vector loop (float8: fp16 bit patterns of code / 256, then the fp16 path; int4: 16 codes at a time unpacked,
// sign-extended and multiplied by their group's scale in registers into fp32, then the fp32 path).
// Each factor is split over threads by rows; a row's mask bytes and values are read from memory once and reused
// from L1 for every block of tokens. Values become fp32 in registers; x, accumulators, intermediates and y are
// fp32. Vector paths, picked at compile time (kernels/cpu.py passes the -m flags this CPU supports):
// - AVX-512 (F, BW, VL, VBMI2): 32 columns per step: one masked expand-load puts the next popcount(mask) 16-bit
//   values at the set bits of a 32-bit mask word (fp32 values: two 16-lane expand-loads); expand-loads read
//   exactly the values they place, so nothing past a row's values is touched.
// - AVX2 (+FMA, F16C): eight columns per step through a permutation table, a 64-bit mask word per loop.
// - scalar: set bits visited with __builtin_ctzll over 64-bit mask words (also the AVX2 path's last columns).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI2__)
#include <immintrin.h>
#define DSF_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DSF_AVX2 1
#endif

namespace {

constexpr int64_t kTokenBlock = 8;  // tokens whose accumulators stay in registers during one pass over a row
// Software prefetch distances: values this many bytes ahead of the word being read, masks this many rows ahead.
// Streaming SmolLM2's factors from memory (2 threads), they took the kernel from 10 to 14 GB/s
// (docs/kernels-notes.md); the hardware prefetcher alone does not run far enough ahead of two interleaved streams.
constexpr int64_t kValuePrefetchBytes = 3072;
constexpr int64_t kMaskPrefetchRows = 16;

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

// One bitmask factor: ``rows`` x ``cols``, ``nbytes = ceil(cols / 8)`` mask bytes per row.
struct Factor {
  const void* values;
  const uint8_t* mask;
  const int32_t* row_ptr;
  int64_t rows, cols, nbytes, nnz;  // nnz: stored values (int4: codes, two per byte of values)
  at::ScalarType dtype;  // kByte: int4 codes
  const void* scale;  // fp16/bf16/fp32 scales: [rows] of int8/float8 codes, [rows, nsg] of int4; nullptr for floats
  at::ScalarType scale_dtype;
  int64_t group_size = 0;  // int4: columns per scale (a multiple of 64); 0 otherwise
  int64_t nsg = 0;  // int4: scales per row, ceil(cols / group_size)
};

inline float to_float(float v) { return v; }
inline float to_float(int8_t v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// Adds the contributions of mask bytes [b0, b1) of one row to acc[t] (t < nt); ``vals`` points at the value of
// the first set bit in byte b0.
template <typename V>
void row_scalar(const uint8_t* mask, int64_t b0, int64_t b1, const V* vals, const float* x, int64_t cols,
                int64_t nt, float* acc) {
  for (int64_t b = b0; b < b1; b += 8) {
    uint64_t word = 0;
    std::memcpy(&word, mask + b, static_cast<size_t>(std::min<int64_t>(8, b1 - b)));
    while (word) {
      const int64_t j = b * 8 + __builtin_ctzll(word);
      word &= word - 1;
      const float w = to_float(*vals++);
      for (int64_t t = 0; t < nt; ++t) acc[t] += w * x[t * cols + j];
    }
  }
}

#if defined(DSF_AVX512)
inline __m512 bf16_to_ps(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The 32 columns of mask word m as two fp32 vectors (columns 0-15, 16-31), zero where the bit is clear; reads
// exactly popcount(m) values from p. DENSE: every bit of m is set, a plain load does (no expand).
template <bool DENSE>
inline void expand32(const c10::Half* p, uint32_t m, __m512& lo, __m512& hi) {
  const __m512i w = DENSE ? _mm512_loadu_si512(p) : _mm512_maskz_expandloadu_epi16(m, p);
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(w));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w, 1));
}
template <bool DENSE>
inline void expand32(const c10::BFloat16* p, uint32_t m, __m512& lo, __m512& hi) {
  const __m512i w = DENSE ? _mm512_loadu_si512(p) : _mm512_maskz_expandloadu_epi16(m, p);
  lo = bf16_to_ps(_mm512_castsi512_si256(w));
  hi = bf16_to_ps(_mm512_extracti64x4_epi64(w, 1));
}
template <bool DENSE>
inline void expand32(const int8_t* p, uint32_t m, __m512& lo, __m512& hi) {
  const __m256i w = DENSE ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                          : _mm256_maskz_expandloadu_epi8(m, p);
  lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(w)));
  hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(w, 1)));
}
template <bool DENSE>
inline void expand32(const float* p, uint32_t m, __m512& lo, __m512& hi) {
  if constexpr (DENSE) {
    lo = _mm512_loadu_ps(p);
    hi = _mm512_loadu_ps(p + 16);
  } else {
    lo = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(m), p);
    hi = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(m >> 16), p + __builtin_popcount(m & 0xffffu));
  }
}

// 16 columns of x; in the last (TAIL) word only the columns below ``cols`` are read (lanes of ``valid``).
template <bool TAIL>
inline __m512 load_x(const float* x, uint64_t valid, int k) {
  if constexpr (TAIL) return _mm512_maskz_loadu_ps(static_cast<__mmask16>(valid >> (16 * k)), x);
  return _mm512_loadu_ps(x);
}

// Adds one 64-column mask word of a row to the NT tokens' K accumulators; returns the values it used. DENSE:
// the word has every bit set (a dense row; only the TAIL word goes through the expand).
template <int NT, int K, bool TAIL, bool DENSE, typename V>
inline int step64(uint64_t word, const V* vals, const float* x, int64_t cols, uint64_t valid, __m512 (&sum)[NT][K]) {
  const uint32_t m0 = static_cast<uint32_t>(word), m1 = static_cast<uint32_t>(word >> 32);
  constexpr bool plain = DENSE && !TAIL;
  prefetch(reinterpret_cast<const char*>(vals) + kValuePrefetchBytes);
  __m512 w[4];
  expand32<plain>(vals, m0, w[0], w[1]);
  expand32<plain>(vals + __builtin_popcount(m0), m1, w[2], w[3]);
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k)
    for (int t = 0; t < NT; ++t)
      sum[t][k % K] = _mm512_fmadd_ps(w[k], load_x<TAIL>(x + t * cols + 16 * k, valid, k), sum[t][k % K]);
  return __builtin_popcountll(word);
}

// One row for exactly NT tokens: the row's dot products in acc[0..NT). DENSE: every bit of the row is set.
template <int NT, bool DENSE, typename V>
void row_vector(const uint8_t* mask, const V* vals, const float* x, int64_t cols, float* acc) {
  constexpr int K = NT <= 4 ? 4 : 2;  // independent accumulators per token (FMA latency vs registers)
  __m512 sum[NT][K];
  for (int t = 0; t < NT; ++t)
    for (int k = 0; k < K; ++k) sum[t][k] = _mm512_setzero_ps();
  const int64_t full = cols / 64, rest = cols % 64;
  for (int64_t wi = 0; wi < full; ++wi) {
    uint64_t word = ~0ull;
    if constexpr (!DENSE) std::memcpy(&word, mask + 8 * wi, 8);
    vals += step64<NT, K, false, DENSE>(word, vals, x + 64 * wi, cols, ~0ull, sum);
  }
  if (rest) {
    uint64_t word = 0;
    std::memcpy(&word, mask + 8 * full, static_cast<size_t>((rest + 7) / 8));
    step64<NT, K, true, DENSE>(word, vals, x + 64 * full, cols, (1ull << rest) - 1, sum);
  }
  for (int t = 0; t < NT; ++t) {
    __m512 total = sum[t][0];
    for (int k = 1; k < K; ++k) total = _mm512_add_ps(total, sum[t][k]);
    acc[t] = _mm512_reduce_add_ps(total);
  }
}
#elif defined(DSF_AVX2)
// kExpand[m]: lane k takes the value of rank popcount(m & ((1 << k) - 1)) among the set bits of byte m.
struct ExpandTable {
  alignas(32) int32_t idx[256][8];
  ExpandTable() {
    for (int m = 0; m < 256; ++m) {
      int rank = 0;
      for (int k = 0; k < 8; ++k) idx[m][k] = (m >> k) & 1 ? rank++ : 0;
    }
  }
};
const ExpandTable kExpand;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// The eight columns of mask byte m as an fp32 vector, zero where the bit is clear (reads eight values).
template <typename V>
inline __m256 expand8(const V* vals, unsigned m) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), bits), bits);
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.idx[m]));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(load8(vals), idx), _mm256_castsi256_ps(set));
}

// One row for exactly NT tokens: whole 64-bit mask words eight columns at a time while 64 values can be read
// without passing ``vals_end`` (expand8 reads eight values whatever the mask), the rest with row_scalar.
template <int NT, typename V>
void row_vector(const uint8_t* mask, int64_t nbytes, const V* vals, const V* vals_end, const float* x,
                int64_t cols, float* acc) {
  __m256 sum[NT][2];
  for (int t = 0; t < NT; ++t) sum[t][0] = sum[t][1] = _mm256_setzero_ps();
  const int64_t words = cols / 64;
  int64_t b = 0;
  for (int64_t wi = 0; wi < words && vals + 64 <= vals_end; ++wi, b += 8) {
    uint64_t word;
    std::memcpy(&word, mask + b, 8);
    prefetch(reinterpret_cast<const char*>(vals) + kValuePrefetchBytes);
    if (!word) continue;
    const float* xw = x + b * 8;
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      const unsigned m = static_cast<unsigned>(word >> (8 * k)) & 0xffu;
      const int off = k ? __builtin_popcountll(word << (64 - 8 * k)) : 0;
      const __m256 w = expand8(vals + off, m);
      for (int t = 0; t < NT; ++t)
        sum[t][k & 1] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xw + t * cols + 8 * k), sum[t][k & 1]);
    }
    vals += __builtin_popcountll(word);
  }
  for (int t = 0; t < NT; ++t) {
    const __m256 total = _mm256_add_ps(sum[t][0], sum[t][1]);
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
    const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
    acc[t] = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
  }
  row_scalar(mask, b, (cols + 7) / 8, vals, x, cols, NT, acc);
}
#endif

// Element k of a factor's scales (row i of row scales, or i * nsg + group of int4's).
inline float scale_at(const Factor& f, int64_t k) {
  switch (f.scale_dtype) {
    case at::kHalf: return to_float(static_cast<const c10::Half*>(f.scale)[k]);
    case at::kBFloat16: return to_float(static_cast<const c10::BFloat16*>(f.scale)[k]);
    default: return static_cast<const float*>(f.scale)[k];
  }
}

// The float8 e4m3fn codes of row i as fp16 bit patterns of code / 256 in buf (row_ptr[i + 1] - row_ptr[i] of
// them), for the fp16 path: e4m3's exponent bias is 7 and fp16's 15, so moving the sign to bit 15 and the other
// seven bits to bits 7..13 divides every value (subnormals included) by exactly 2^8; the caller multiplies the
// row's scale by 256. (The NaN code, which readers reject, would become a finite value.)
void decode_fp8_row(const Factor& f, int64_t i, uint16_t* __restrict buf) {
  const int64_t p0 = f.row_ptr[i], n = f.row_ptr[i + 1] - p0;
  const uint8_t* __restrict b = static_cast<const uint8_t*>(f.values) + p0;
  for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<uint16_t>(((b[k] & 0x80u) << 8) | ((b[k] & 0x7Fu) << 7));
}

// Codes q .. q+15 of an int4 stream as 16 sign-extended int8 lanes: the 16 bytes from q / 2 split into nibbles,
// interleaved (low first), shifted by one code when q is odd.
#if defined(DSF_AVX512) || defined(DSF_AVX2)
inline __m128i int4_codes16(const uint8_t* bytes, int64_t q) {
  const __m128i low4 = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + (q >> 1)));
  const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
  const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);
  const __m128i odd = _mm_set1_epi8(static_cast<char>(-(q & 1)));  // branchless: q's parity changes by group
  const __m128i codes = _mm_blendv_epi8(first, _mm_alignr_epi8(second, first, 1), odd);
  return _mm_sub_epi8(_mm_xor_si128(codes, eight), eight);
}
#endif

// The int4 codes of row i times their group's scale as fp32 in buf (row_ptr[i + 1] - row_ptr[i] of them), group by
// group (a group is whole 64-column mask words). The vector paths turn 16 codes into 16 floats in registers,
// reading 16 bytes at a time while those lie inside the values.
void decode_int4_row(const Factor& f, int64_t i, float* __restrict buf) {
  const int64_t p0 = f.row_ptr[i];
  const uint8_t* __restrict bytes = static_cast<const uint8_t*>(f.values);
  const int64_t total_bytes = (f.nnz + 1) / 2;
  const uint8_t* mask = f.mask + i * f.nbytes;
  const int64_t group_bytes = f.group_size / 8;
  int64_t k = 0;
  for (int64_t g = 0; g < f.nsg; ++g) {
    int64_t count = 0;
    for (int64_t b = g * group_bytes; b < std::min(f.nbytes, (g + 1) * group_bytes); b += 8) {
      uint64_t word = 0;
      std::memcpy(&word, mask + b, static_cast<size_t>(std::min<int64_t>(8, f.nbytes - b)));
      count += __builtin_popcountll(word);
    }
    const float s = scale_at(f, i * f.nsg + g);
    const int64_t end = k + count;
#if defined(DSF_AVX512)
    const __m512 sv = _mm512_set1_ps(s);
    for (; k < end && ((p0 + k) >> 1) + 16 <= total_bytes; k += 16) {  // the group's last step masked
      const __mmask16 m = end - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (end - k)) - 1);
      const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(int4_codes16(bytes, p0 + k)));
      _mm512_mask_storeu_ps(buf + k, m, _mm512_mul_ps(v, sv));
    }
    k = std::min(k, end);
#elif defined(DSF_AVX2)
    const __m256 sv = _mm256_set1_ps(s);
    for (; k + 16 <= end && ((p0 + k) >> 1) + 16 <= total_bytes; k += 16) {
      const __m128i c = int4_codes16(bytes, p0 + k);
      _mm256_storeu_ps(buf + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), sv));
      _mm256_storeu_ps(buf + k + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8))), sv));
    }
#endif
    for (; k < end; ++k) {
      const int64_t q = p0 + k;
      buf[k] = static_cast<float>((((bytes[q >> 1] >> ((q & 1) * 4)) & 15) ^ 8) - 8) * s;
    }
  }
}

// Dot products of row i of f with nt tokens (any count), written to y[t * f.rows + i]; the row's values are
// vals[0 .. row length) (vals_end: the end of the readable values). DENSE: every bit of f's mask is set (only the
// AVX-512 path skips the mask for it).
template <typename V, bool DENSE = false>
void row(const Factor& f, int64_t i, const float* x, int64_t nt, float* y, const V* vals, const V* vals_end) {
  const uint8_t* mask = f.mask + i * f.nbytes;
  for (int64_t b = 0; b < f.nbytes; b += 64) prefetch(mask + kMaskPrefetchRows * f.nbytes + b);
  for (int64_t t0 = 0; t0 < nt; t0 += kTokenBlock) {
    const int64_t n = std::min(kTokenBlock, nt - t0);
    const float* xb = x + t0 * f.cols;
    float acc[kTokenBlock] = {0.f};
#if defined(DSF_AVX512)
#define DSF_ROW(N) row_vector<N, DENSE>(mask, vals, xb, f.cols, acc)
#elif defined(DSF_AVX2)
#define DSF_ROW(N) row_vector<N>(mask, f.nbytes, vals, vals_end, xb, f.cols, acc)
#endif
#ifdef DSF_ROW
    switch (n) {
      case 1: DSF_ROW(1); break;
      case 2: DSF_ROW(2); break;
      case 3: DSF_ROW(3); break;
      case 4: DSF_ROW(4); break;
      case 5: DSF_ROW(5); break;
      case 6: DSF_ROW(6); break;
      case 7: DSF_ROW(7); break;
      default: DSF_ROW(8); break;
    }
#undef DSF_ROW
#else
    row_scalar(mask, 0, f.nbytes, vals, xb, f.cols, n, acc);
#endif
    (void)vals_end;
    // int4 codes are scaled while decoded; float8 codes run as fp16 values 256 times too small
    const float scale = !f.scale || f.group_size ? 1.f : scale_at(f, i) * (f.dtype == at::kFloat8_e4m3fn ? 256.f : 1.f);
    for (int64_t t = 0; t < n; ++t) y[(t0 + t) * f.rows + i] = acc[t] * scale;
  }
}

// row() over row i's values where they are stored (float and int8 values).
template <typename V>
inline void row_of(const Factor& f, int64_t i, const float* x, int64_t nt, float* y) {
  const V* all = static_cast<const V*>(f.values);
  row<V>(f, i, x, nt, y, all + f.row_ptr[i], all + f.nnz);
}

// y[nt, f.rows] = x[nt, f.cols]·fᵀ, rows split over threads (about 64 KiB of weights and x per task, so small
// factors do not pay for threads they cannot use).
void apply(const Factor& f, const float* x, int64_t nt, float* y) {
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, f.nbytes + f.cols * nt));
  const bool int4 = f.dtype == at::kByte, fp8 = f.dtype == at::kFloat8_e4m3fn;
  at::parallel_for(0, f.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(int4 ? static_cast<size_t>(f.cols) : 0);
    std::vector<c10::Half> half(fp8 ? static_cast<size_t>(f.cols) : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = f.row_ptr[i + 1] - f.row_ptr[i];
      switch (f.dtype) {
        case at::kHalf: row_of<c10::Half>(f, i, x, nt, y); break;
        case at::kBFloat16: row_of<c10::BFloat16>(f, i, x, nt, y); break;
        case at::kChar: row_of<int8_t>(f, i, x, nt, y); break;
        case at::kFloat8_e4m3fn:
          decode_fp8_row(f, i, reinterpret_cast<uint16_t*>(half.data()));
          row<c10::Half>(f, i, x, nt, y, half.data(), half.data() + n);
          break;
        case at::kByte:
          decode_int4_row(f, i, buf.data());
          row<float>(f, i, x, nt, y, buf.data(), buf.data() + n);
          break;
        default: row_of<float>(f, i, x, nt, y); break;
      }
    }
  });
}

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "bitmask_linear: ", name,
              " must be a contiguous CPU tensor");
}

bool value_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kChar;
}

bool scale_dtype(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat; }

// Scales of a matrix with ``rows`` rows: int8 and float8 codes need a float16/bfloat16/float32 [rows] tensor, int4
// codes (``nsg`` > 0) [rows, nsg], float values none (an empty tensor). Returns the pointer the kernel reads (nullptr
// for float values).
const void* scales_of(const torch::Tensor& scale, at::ScalarType values, int64_t rows, int64_t nsg, const char* op,
                      size_t index) {
  if (values != at::kChar && values != at::kFloat8_e4m3fn && nsg == 0) {
    TORCH_CHECK(!scale.defined() || scale.numel() == 0, op, ": factor ", index,
                ": scales are only for int8, float8 or int4 codes, got ", values, " values with scales");
    return nullptr;
  }
  const bool ok = nsg ? scale.defined() && scale.dim() == 2 && scale.size(0) == rows && scale.size(1) == nsg
                      : scale.defined() && scale.dim() == 1 && scale.size(0) == rows;
  TORCH_CHECK(ok && scale_dtype(scale.scalar_type()), op, ": factor ", index, ": ", nsg ? "int4" : "int8/float8",
              " codes need float16, bfloat16 or float32 scales [", rows, nsg ? ", " + std::to_string(nsg) : "",
              "], got ", scale.defined() ? scale.sizes() : at::IntArrayRef{});
  check_cpu(scale, "scales");
  return scale.data_ptr();
}

// Checks one factor's tensors (dtypes, shapes, row_ptr from 0 to nnz; popcounts are the caller's contract).
// group_size > 0: int4 codes, uint8 values of ceil(nnz / 2) bytes.
Factor factor(const torch::Tensor& values, const torch::Tensor& bitmask, const torch::Tensor& row_ptr,
              const torch::Tensor& scale, int64_t cols, int64_t group_size, size_t index) {
  check_cpu(values, "values");
  check_cpu(bitmask, "bitmask");
  check_cpu(row_ptr, "row_ptr");
  TORCH_CHECK(cols >= 0, "bitmask_linear: factor ", index, ": cols must be >= 0, got ", cols);
  TORCH_CHECK(group_size >= 0 && group_size % 64 == 0, "bitmask_linear: factor ", index,
              ": group_size must be 0 or a multiple of 64, got ", group_size);
  const at::ScalarType vt = values.scalar_type();
  TORCH_CHECK(values.dim() == 1 && (group_size ? vt == at::kByte : value_dtype(vt) || vt == at::kFloat8_e4m3fn),
              "bitmask_linear: factor ", index, group_size ? ": int4 values must be 1-D uint8" :
              ": values must be 1-D float16, bfloat16, float32, int8 or float8_e4m3fn", ", got ", vt, " ",
              values.sizes());
  TORCH_CHECK(bitmask.scalar_type() == at::kByte && bitmask.dim() == 2 && bitmask.size(1) == (cols + 7) / 8,
              "bitmask_linear: factor ", index, ": bitmask must be uint8 [rows, ", (cols + 7) / 8, "], got ",
              bitmask.scalar_type(), " ", bitmask.sizes());
  const int64_t rows = bitmask.size(0);
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && row_ptr.dim() == 1 && row_ptr.size(0) == rows + 1,
              "bitmask_linear: factor ", index, ": row_ptr must be int32 [", rows + 1, "], got ",
              row_ptr.scalar_type(), " ", row_ptr.sizes());
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int64_t nnz = group_size ? rp[rows] : values.numel();
  TORCH_CHECK(rp[0] == 0 && rp[rows] == nnz && (!group_size || (nnz + 1) / 2 == values.numel()),
              "bitmask_linear: factor ", index, ": row_ptr must run from 0 to nnz = ",
              group_size ? "2 * values.numel() (or one less)" : std::to_string(values.numel()), ", got ", rp[0],
              " to ", rp[rows]);
  const int64_t nsg = group_size ? (cols + group_size - 1) / group_size : 0;
  const void* sp = scales_of(scale, vt, rows, nsg, "bitmask_linear", index);
  return {values.data_ptr(), bitmask.data_ptr<uint8_t>(), rp, rows, cols, (cols + 7) / 8, nnz, vt, sp,
          sp ? scale.scalar_type() : at::kFloat, group_size, nsg};
}

// The [..., rows] output: ``out`` after checking it, else a new tensor.
torch::Tensor output(const torch::Tensor& x, int64_t rows, const c10::optional<torch::Tensor>& out) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = rows;
  if (!out.has_value()) return torch::empty(shape, x.options());
  const torch::Tensor& y = *out;
  TORCH_CHECK(y.device().is_cpu() && y.is_contiguous() && y.scalar_type() == at::kFloat &&
                  y.sizes() == at::IntArrayRef(shape),
              "bitmask_linear: out must be a contiguous float32 CPU tensor ", at::IntArrayRef(shape), ", got ",
              y.scalar_type(), " ", y.sizes());
  return y;
}

}  // namespace

// y = F0·(F1·(…·Fn-1·x)) for bitmask factors given outermost first (values[k], bitmasks[k], row_ptrs[k], cols[k],
// group_sizes[k]: values [nnz] fp16/bf16/fp32/int8/float8_e4m3fn or, with group_sizes[k] > 0, int4 codes uint8
// [ceil(nnz / 2)]; scales [rows] fp16/bf16/fp32 for int8/float8 codes, [rows, ceil(cols / group_size)] for int4
// (else empty); bitmask [rows, ceil(cols / 8)] uint8, row_ptr [rows + 1] int32 from 0 to nnz with popcounts as
// validated by BitmaskMatrix.validate). x: [..., cols[n-1]] fp32, contiguous; out: optional [..., rows[0]] fp32 to
// write into. Returns y: [..., rows[0]] fp32; intermediates are fp32.
torch::Tensor bitmask_linear(const torch::Tensor& x, const std::vector<torch::Tensor>& values,
                             const std::vector<torch::Tensor>& bitmasks, const std::vector<torch::Tensor>& row_ptrs,
                             const std::vector<torch::Tensor>& scales, const std::vector<int64_t>& cols,
                             const std::vector<int64_t>& group_sizes, const c10::optional<torch::Tensor>& out) {
  const size_t n = values.size();
  TORCH_CHECK(n >= 1 && bitmasks.size() == n && row_ptrs.size() == n && scales.size() == n && cols.size() == n &&
                  group_sizes.size() == n,
              "bitmask_linear: values, bitmasks, row_ptrs, scales, cols and group_sizes must list the same factors "
              "(at least one)");
  std::vector<Factor> fs;
  fs.reserve(n);
  for (size_t k = 0; k < n; ++k)
    fs.push_back(factor(values[k], bitmasks[k], row_ptrs[k], scales[k], cols[k], group_sizes[k], k));
  for (size_t k = 0; k + 1 < n; ++k)
    TORCH_CHECK(fs[k].cols == fs[k + 1].rows, "bitmask_linear: factor ", k, " has ", fs[k].cols,
                " columns but factor ", k + 1, " has ", fs[k + 1].rows, " rows");
  check_cpu(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) == fs.back().cols,
              "bitmask_linear: x must be float32 [..., ", fs.back().cols, "], got ", x.scalar_type(), " ",
              x.sizes());
  torch::Tensor y = output(x, fs.front().rows, out);
  const int64_t nt = fs.front().rows ? y.numel() / fs.front().rows : 0;
  if (y.numel() == 0) return y;
  const float* h = x.data_ptr<float>();
  torch::Tensor buffers[2];
  for (size_t k = n; k-- > 0;) {
    float* dst = y.data_ptr<float>();
    if (k) {
      buffers[k & 1] = torch::empty({nt, fs[k].rows}, x.options());
      dst = buffers[k & 1].data_ptr<float>();
    }
    apply(fs[k], h, nt, dst);
    h = dst;
  }
  return y;
}

namespace {
// The one row of f (a dense row as a bitmask factor with every bit set).
template <typename V>
inline void dense_row(const Factor& f, const float* x, int64_t nt, float* y) {
  const V* vals = static_cast<const V*>(f.values);
  row<V, true>(f, 0, x, nt, y, vals, vals + f.cols);
}
}  // namespace

// y[..., out] = x[..., in]·Wᵀ for a dense W [out, in] in fp16/bf16/fp32, or int8 with scale [out] (fp16/bf16/fp32,
// else undefined or empty); x, y fp32 (out: optional y to write).
torch::Tensor dense_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& scale,
                           const c10::optional<torch::Tensor>& out) {
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 2 && value_dtype(weight.scalar_type()),
              "dense_linear: weight must be 2-D float16, bfloat16, float32 or int8, got ", weight.scalar_type(), " ",
              weight.sizes());
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const void* sp = scales_of(scale.value_or(torch::Tensor()), weight.scalar_type(), rows, 0, "dense_linear", 0);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) == cols,
              "dense_linear: x must be float32 [..., ", cols, "], got ", x.scalar_type(), " ", x.sizes());
  torch::Tensor y = output(x, rows, out);
  if (y.numel() == 0) return y;
  // A dense row is a one-row bitmask factor with every bit set: each row of W reuses one all-ones mask.
  const int64_t nt = y.numel() / rows, nbytes = (cols + 7) / 8;
  std::vector<uint8_t> ones(static_cast<size_t>(nbytes), 0xff);
  if (cols % 8) ones.back() = static_cast<uint8_t>((1u << (cols % 8)) - 1);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const at::ScalarType scale_dtype = sp ? scale->scalar_type() : at::kFloat;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, cols * (2 + nt)));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    const int32_t rp[2] = {0, static_cast<int32_t>(cols)};
    std::vector<float> acc(static_cast<size_t>(nt));
    for (int64_t i = begin; i < end; ++i) {
      const auto* base = static_cast<const uint8_t*>(weight.data_ptr()) + i * cols * weight.element_size();
      const void* row_scale_ptr = sp ? static_cast<const uint8_t*>(sp) + i * scale->element_size() : nullptr;
      const Factor f{base, ones.data(), rp, 1, cols, nbytes, cols, weight.scalar_type(), row_scale_ptr, scale_dtype};
      switch (f.dtype) {
        case at::kHalf: dense_row<c10::Half>(f, xp, nt, acc.data()); break;
        case at::kBFloat16: dense_row<c10::BFloat16>(f, xp, nt, acc.data()); break;
        case at::kChar: dense_row<int8_t>(f, xp, nt, acc.data()); break;
        default: dense_row<float>(f, xp, nt, acc.data()); break;
      }
      for (int64_t t = 0; t < nt; ++t) yp[t * rows + i] = acc[t];
    }
  });
  return y;
}

// Which vector path this build compiled in (for logs and benchmarks).
std::string simd() {
#if defined(DSF_AVX512)
  return "avx512";
#elif defined(DSF_AVX2)
  return "avx2+fma+f16c";
#else
  return "scalar";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bitmask_linear", &bitmask_linear, "y = F0·(F1·(…·x)) for bitmask factors, outermost first (fp32 out)",
        py::arg("x"), py::arg("values"), py::arg("bitmasks"), py::arg("row_ptrs"), py::arg("scales"),
        py::arg("cols"), py::arg("group_sizes"), py::arg("out") = py::none());
  m.def("dense_linear", &dense_linear, "y = x @ W.T for a dense fp16/bf16/fp32 W, or int8 W with row scales (fp32 "
        "in and out)", py::arg("x"), py::arg("weight"), py::arg("scale") = py::none(), py::arg("out") = py::none());
  m.def("simd", &simd, "the vector path compiled in");
}
