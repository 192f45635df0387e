// y[t, i] = sum_j x[t, j] * W[i, j] for W in the ``bitmask`` layout (docs/format.md): one presence bit per
// element (bit j & 7 of byte j >> 3 of row i), the non-zeros row by row in ``values`` from ``row_ptr[i]``.
//
// Each thread takes a range of rows; a row's mask bytes and values are read from memory once and reused from L1
// for every block of tokens. Values (fp16/bf16/fp32) become fp32 in registers; x, the accumulators and y are fp32.
// With AVX2+FMA+F16C (compiled with -mavx2 -mfma -mf16c), eight columns go per step: the next eight values are
// placed at the set bits of the mask byte by a permutation table and FMA'd with x, a 64-bit mask word per loop.
// Otherwise, and for the last columns, set bits are visited with __builtin_ctzll over 64-bit mask words.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DSF_AVX2 1
#endif

namespace {

constexpr int64_t kTokenBlock = 8;  // tokens whose accumulators stay in registers during one pass over a row

inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// Adds the contributions of mask bytes [b0, b1) of one row to acc[t] (t < nt); ``vals`` points at the value of
// the first set bit in byte b0. Returns the pointer past the last value used.
template <typename V>
const V* row_scalar(const uint8_t* mask, int64_t b0, int64_t b1, const V* vals, const float* x, int64_t cols,
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
  return vals;
}

#ifdef DSF_AVX2
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
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// The eight columns of mask byte m as an fp32 vector, zero where the bit is clear.
template <typename V>
inline __m256 expand8(const V* vals, unsigned m) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), bits), bits);
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.idx[m]));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(load8(vals), idx), _mm256_castsi256_ps(set));
}

// One row for exactly NT tokens: whole 64-bit mask words (64 columns) eight columns at a time while 64 values
// can be read without passing ``vals_end``, the rest with row_scalar. The value offsets of the eight bytes of a
// word are independent popcounts and each token has two accumulators, so no step waits on the previous one.
// Returns the row's dot products in acc[0..NT).
template <int NT, typename V>
void row_avx2(const uint8_t* mask, int64_t nbytes, const V* vals, const V* vals_end, const float* x, int64_t cols,
              float* acc) {
  __m256 sum[NT][2];
  for (int t = 0; t < NT; ++t) sum[t][0] = sum[t][1] = _mm256_setzero_ps();
  const int64_t words = cols / 64;
  int64_t b = 0;
  for (int64_t wi = 0; wi < words && vals + 64 <= vals_end; ++wi, b += 8) {
    uint64_t word;
    std::memcpy(&word, mask + b, 8);
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
  row_scalar(mask, b, nbytes, vals, x, cols, NT, acc);
}
#endif

// One row for nt tokens (any count), written to y[t * rows + i].
template <typename V>
void row(const uint8_t* mask, int64_t nbytes, const V* vals, const V* vals_end, const float* x, int64_t cols,
         int64_t nt, float* y, int64_t rows) {
  for (int64_t t0 = 0; t0 < nt; t0 += kTokenBlock) {
    const int64_t n = std::min(kTokenBlock, nt - t0);
    const float* xb = x + t0 * cols;
    float acc[kTokenBlock] = {0.f};
#ifdef DSF_AVX2
    switch (n) {
      case 1: row_avx2<1>(mask, nbytes, vals, vals_end, xb, cols, acc); break;
      case 2: row_avx2<2>(mask, nbytes, vals, vals_end, xb, cols, acc); break;
      case 3: row_avx2<3>(mask, nbytes, vals, vals_end, xb, cols, acc); break;
      case 4: row_avx2<4>(mask, nbytes, vals, vals_end, xb, cols, acc); break;
      case 5: row_avx2<5>(mask, nbytes, vals, vals_end, xb, cols, acc); break;
      case 6: row_avx2<6>(mask, nbytes, vals, vals_end, xb, cols, acc); break;
      case 7: row_avx2<7>(mask, nbytes, vals, vals_end, xb, cols, acc); break;
      default: row_avx2<8>(mask, nbytes, vals, vals_end, xb, cols, acc); break;
    }
#else
    (void)vals_end;
    row_scalar(mask, 0, nbytes, vals, xb, cols, n, acc);
#endif
    for (int64_t t = 0; t < n; ++t) y[(t0 + t) * rows] = acc[t];
  }
}

template <typename V>
void run(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& bitmask,
         const torch::Tensor& row_ptr, int64_t rows, int64_t cols, torch::Tensor& y) {
  const int64_t nt = x.size(0), nbytes = bitmask.size(1);
  const float* xp = x.data_ptr<float>();
  const V* vp = reinterpret_cast<const V*>(values.data_ptr());
  const V* vend = vp + values.numel();
  const uint8_t* mp = bitmask.data_ptr<uint8_t>();
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  // About 64 KiB of weights per task so that small matrices do not pay for threads they cannot use.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, nbytes + cols * nt));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      row(mp + i * nbytes, nbytes, vp + rp[i], vend, xp, cols, nt, yp + i, rows);
  });
}

}  // namespace

// x: [T, cols] fp32; values: [nnz] fp16/bf16/fp32; bitmask: [rows, ceil(cols / 8)] uint8; row_ptr: [rows + 1]
// int32 (row_ptr[0] == 0, row_ptr[rows] == nnz, popcounts as validated by BitmaskMatrix.validate).
// out: optional [T, rows] fp32 to write into. Returns y: [T, rows] fp32.
torch::Tensor bitmask_matmul(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& bitmask,
                             const torch::Tensor& row_ptr, int64_t rows, int64_t cols,
                             const c10::optional<torch::Tensor>& out) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "bitmask_matmul: rows and cols must be >= 0, got ", rows, ", ", cols);
  for (const auto* t : {&x, &values, &bitmask, &row_ptr}) {
    TORCH_CHECK(t->device().is_cpu(), "bitmask_matmul: every tensor must be on the CPU, got ", t->device());
    TORCH_CHECK(t->is_contiguous(), "bitmask_matmul: every tensor must be contiguous");
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == cols,
              "bitmask_matmul: x must be float32 [T, ", cols, "], got ", x.scalar_type(), " ", x.sizes());
  const auto vt = values.scalar_type();
  TORCH_CHECK(values.dim() == 1 && (vt == at::kHalf || vt == at::kBFloat16 || vt == at::kFloat),
              "bitmask_matmul: values must be 1-D float16, bfloat16 or float32, got ", vt, " ", values.sizes());
  TORCH_CHECK(bitmask.scalar_type() == at::kByte && bitmask.dim() == 2 && bitmask.size(0) == rows &&
                  bitmask.size(1) == (cols + 7) / 8,
              "bitmask_matmul: bitmask must be uint8 [", rows, ", ", (cols + 7) / 8, "], got ",
              bitmask.scalar_type(), " ", bitmask.sizes());
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && row_ptr.dim() == 1 && row_ptr.size(0) == rows + 1,
              "bitmask_matmul: row_ptr must be int32 [", rows + 1, "], got ", row_ptr.scalar_type(), " ",
              row_ptr.sizes());
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  TORCH_CHECK(rp[0] == 0 && rp[rows] == values.numel(), "bitmask_matmul: row_ptr must run from 0 to nnz = ",
              values.numel(), ", got ", rp[0], " to ", rp[rows]);
  torch::Tensor y;
  if (out.has_value()) {
    y = *out;
    TORCH_CHECK(y.device().is_cpu() && y.is_contiguous() && y.scalar_type() == at::kFloat && y.dim() == 2 &&
                    y.size(0) == x.size(0) && y.size(1) == rows,
                "bitmask_matmul: out must be a contiguous float32 CPU tensor [", x.size(0), ", ", rows, "]");
  } else {
    y = torch::empty({x.size(0), rows}, x.options());
  }
  if (y.numel() == 0) return y;
  switch (vt) {
    case at::kHalf: run<c10::Half>(x, values, bitmask, row_ptr, rows, cols, y); break;
    case at::kBFloat16: run<c10::BFloat16>(x, values, bitmask, row_ptr, rows, cols, y); break;
    default: run<float>(x, values, bitmask, row_ptr, rows, cols, y); break;
  }
  return y;
}

// Which vector path this build compiled in (for logs and benchmarks).
std::string simd() {
#ifdef DSF_AVX2
  return "avx2+fma+f16c";
#else
  return "scalar";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bitmask_matmul", &bitmask_matmul, "y[T, rows] = x[T, cols] @ W.T for a bitmask-layout W (fp32 out)",
        py::arg("x"), py::arg("values"), py::arg("bitmask"), py::arg("row_ptr"), py::arg("rows"), py::arg("cols"),
        py::arg("out") = py::none());
  m.def("simd", &simd, "the vector path compiled in");
}
