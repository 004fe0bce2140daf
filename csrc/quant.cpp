// Quantized frozen weights: panel dequantization (NF4 / int8) and the panel GEMMs (see quant.h).
//
// The NF4 lookup is a register table: 16 codes in one zmm (AVX-512 vpermps) or two ymm (AVX2
// vpermps + blend on bit 3), 32 / 8 values per step; scalar code elsewhere.  Each block's absmax is
// decoded once per panel row segment.  The GEMMs dequantize a panel of ~1 MiB of W (a block of rows
// of W for y = x W^T, of columns for dX = gy W; in float32 a 256-wide slice of the contraction,
// accumulated, so a panel is never a narrow GEMM) and hand it to at::mm_out / addmm_ (MKL /
// oneDNN), writing disjoint column blocks of the output; with at least one block per thread each
// thread takes its own (its GEMMs then run single-threaded), otherwise the GEMMs use every thread.
#include "quant.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef FASTPEFT_QUANT_NAMESPACE
#define FASTPEFT_QUANT_NAMESPACE fastpeft_cpp
#endif

namespace fastpeft {
namespace quant {
namespace {

alignas(64) constexpr float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};
constexpr float kInv127 = 7.874015718698502e-3f;  // bnb int8_vectorwise_dequant (fp32)
constexpr int64_t kDefaultPanelBytes = int64_t{1} << 20;
// float32 contraction slice of a panel (its other side fills the panel bytes).
#ifndef FASTPEFT_QUANT_SLICE
#define FASTPEFT_QUANT_SLICE 256
#endif
constexpr int64_t kSliceWidth = FASTPEFT_QUANT_SLICE;

// Rounding applied before the store: through the weight's 16-bit dtype when the buffer's type
// differs, and (kBF16F16) then through float16 for a float32 buffer standing in for float16.
enum Round { kNone = 0, kBF16 = 1, kF16 = 2, kBF16F16 = 3 };

// Keeps the compiler from contracting a product and the following sum into one FMA (bnb rounds both).
inline float opaque(float v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(v));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(v));
#else
  volatile float t = v;
  v = t;
#endif
  return v;
}

template <int RT>
inline float round_through(float v) {
  if constexpr (RT == kBF16) return static_cast<float>(c10::BFloat16(v));
  if constexpr (RT == kF16) return static_cast<float>(c10::Half(v));
  if constexpr (RT == kBF16F16) return static_cast<float>(c10::Half(static_cast<float>(c10::BFloat16(v))));
  return v;
}

template <typename T, int RT>
inline T cvt(float v) {
  v = round_through<RT>(v);
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return T(v);  // c10's round-to-nearest-even conversions, as torch's .to()
  }
}

inline float block_scale(const QuantWeight& q, int64_t b) {
  if (q.absmax_q == nullptr) return q.absmax[b];
  return opaque(q.absmax_code[q.absmax_q[b]] * q.absmax2[b / q.absmax_blocksize]) + q.absmax_offset;
}

// ------------------------------------------------------------------------------------------------
// Vector helpers: v (fp32 lanes) -> round through the weight dtype -> store as T.

#if defined(__AVX512F__)
inline __m512i bf16_bits(__m512 v) {  // round to nearest even, result in the high halves
  __m512i b = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
}

template <int RT>
inline __m512 round16(__m512 v) {
  if constexpr (RT == kBF16 || RT == kBF16F16) {
    v = _mm512_castsi512_ps(_mm512_and_si512(bf16_bits(v), _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  if constexpr (RT == kF16 || RT == kBF16F16) {
    v = _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  return v;
}

template <typename T, int RT>
inline void store16(T* out, __m512 v) {
  v = round16<RT>(v);
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(out, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(v), 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), h);
  } else {
    __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), h);
  }
}

// 8 packed bytes -> 16 code indices in value order (high nibble first).
inline __m512i nf4_index16(const uint8_t* p) {
  __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  __m128i m = _mm_set1_epi8(0x0f);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m);
  __m128i lo = _mm_and_si128(raw, m);
  return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
}
#elif defined(__AVX2__)
inline __m256i bf16_bits(__m256 v) {
  __m256i b = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
}

template <int RT>
inline __m256 round8(__m256 v) {
  if constexpr (RT == kBF16 || RT == kBF16F16) {
    v = _mm256_castsi256_ps(_mm256_and_si256(bf16_bits(v), _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  if constexpr (RT == kF16 || RT == kBF16F16) {
#if defined(__F16C__)
    v = _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (float& x : t) x = round_through<kF16>(x);
    v = _mm256_load_ps(t);
#endif
  }
  return v;
}

template <typename T, int RT>
inline void store8(T* out, __m256 v) {
  v = round8<RT>(v);
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(out, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    __m256i w = _mm256_srli_epi32(bf16_bits(v), 16);
    __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), h);
  } else {
#if defined(__F16C__)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (int i = 0; i < 8; ++i) out[i] = c10::Half(t[i]);
#endif
  }
}

// 4 packed bytes -> 8 code values (two 8-entry tables, the 4th index bit picks one).
inline __m256 nf4_lookup8(const uint8_t* p, __m256 lut_lo, __m256 lut_hi) {
  int32_t word;
  std::memcpy(&word, p, 4);
  __m128i raw = _mm_cvtsi32_si128(word);
  __m128i m = _mm_set1_epi8(0x0f);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m);
  __m128i lo = _mm_and_si128(raw, m);
  __m256i idx = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
  __m256 a = _mm256_permutevar8x32_ps(lut_lo, idx);
  __m256 b = _mm256_permutevar8x32_ps(lut_hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
#endif

// ------------------------------------------------------------------------------------------------
// NF4: values [e0, e1) of the flattened weight into out[0 : e1 - e0].

template <typename T, int RT>
void nf4_flat(const QuantWeight& q, int64_t e0, int64_t e1, T* out) {
  const int64_t bs = q.blocksize;
  const uint8_t* packed = q.packed;
#if defined(__AVX512F__)
  const __m512 lut = _mm512_load_ps(kNF4);
#elif defined(__AVX2__)
  const __m256 lut_lo = _mm256_load_ps(kNF4);
  const __m256 lut_hi = _mm256_load_ps(kNF4 + 8);
#endif
  int64_t e = e0;
  while (e < e1) {
    const int64_t b = e / bs;
    const int64_t hi = std::min(e1, (b + 1) * bs);
    const float s = block_scale(q, b);
    if (e & 1) {  // a low nibble first: then every step starts on a byte
      *out++ = cvt<T, RT>(kNF4[packed[e >> 1] & 15] * s);
      ++e;
    }
#if defined(__AVX512F__)
    const __m512 vs = _mm512_set1_ps(s);
    for (; e + 32 <= hi; e += 32, out += 32) {
      const uint8_t* p = packed + (e >> 1);
      store16<T, RT>(out, _mm512_mul_ps(_mm512_permutexvar_ps(nf4_index16(p), lut), vs));
      store16<T, RT>(out + 16, _mm512_mul_ps(_mm512_permutexvar_ps(nf4_index16(p + 8), lut), vs));
    }
    for (; e + 16 <= hi; e += 16, out += 16) {
      store16<T, RT>(out, _mm512_mul_ps(_mm512_permutexvar_ps(nf4_index16(packed + (e >> 1)), lut), vs));
    }
#elif defined(__AVX2__)
    const __m256 vs = _mm256_set1_ps(s);
    for (; e + 8 <= hi; e += 8, out += 8) {
      store8<T, RT>(out, _mm256_mul_ps(nf4_lookup8(packed + (e >> 1), lut_lo, lut_hi), vs));
    }
#endif
    for (; e < hi; ++e) {
      const uint8_t byte = packed[e >> 1];
      *out++ = cvt<T, RT>(kNF4[(e & 1) ? (byte & 15) : (byte >> 4)] * s);
    }
  }
}

// int8: W[r, c0:c1] into out[0 : c1 - c0].
template <typename T, int RT>
void int8_row(const QuantWeight& q, int64_t r, int64_t c0, int64_t c1, T* out) {
  const int8_t* src = q.cb + r * q.k;
  const float s = q.scb[r];
  int64_t c = c0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(s);
  const __m512 vinv = _mm512_set1_ps(kInv127);
  for (; c + 16 <= c1; c += 16, out += 16) {
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c));
    __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
    store16<T, RT>(out, _mm512_mul_ps(_mm512_mul_ps(v, vs), vinv));
  }
#elif defined(__AVX2__)
  const __m256 vs = _mm256_set1_ps(s);
  const __m256 vinv = _mm256_set1_ps(kInv127);
  for (; c + 8 <= c1; c += 8, out += 8) {
    __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + c));
    __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
    store8<T, RT>(out, _mm256_mul_ps(_mm256_mul_ps(v, vs), vinv));
  }
#endif
  for (; c < c1; ++c) *out++ = cvt<T, RT>((static_cast<float>(src[c]) * s) * kInv127);
}

template <typename T, int RT>
void block_impl(const QuantWeight& q, int64_t r0, int64_t r1, int64_t c0, int64_t c1, T* out, int64_t ld) {
  if (r1 <= r0 || c1 <= c0) return;
  if (q.format == Format::kNF4) {
    if (c0 == 0 && c1 == q.k && ld == q.k) {  // whole rows: one contiguous flat range
      nf4_flat<T, RT>(q, r0 * q.k, r1 * q.k, out);
      return;
    }
    for (int64_t r = r0; r < r1; ++r) nf4_flat<T, RT>(q, r * q.k + c0, r * q.k + c1, out + (r - r0) * ld);
  } else {
    for (int64_t r = r0; r < r1; ++r) int8_row<T, RT>(q, r, c0, c1, out + (r - r0) * ld);
  }
}

// The rounding that makes a T buffer hold W.to(as) for W in the weight's dtype.
template <typename T>
int round_kind(at::ScalarType weight_dtype, at::ScalarType as) {
  const at::ScalarType store = c10::CppTypeToScalarType<T>::value;
  const bool wide_store = store == at::kFloat && as != at::kFloat;  // float32 standing in for `as`
  int kind = kNone;
  if (weight_dtype != at::kFloat && weight_dtype != store) kind = weight_dtype == at::kBFloat16 ? kBF16 : kF16;
  TORCH_INTERNAL_ASSERT(!wide_store || as == at::kHalf, "fastpeft_cpp quant: no float32 stand-in for ", as);
  if (wide_store) kind = kind == kBF16 ? kBF16F16 : kF16;
  return kind;
}

template <typename T>
void dequantize_as(const QuantWeight& q, int64_t r0, int64_t r1, int64_t c0, int64_t c1, T* out, int64_t ld,
                   at::ScalarType as) {
  switch (round_kind<T>(q.weight_dtype, as)) {
    case kBF16: return block_impl<T, kBF16>(q, r0, r1, c0, c1, out, ld);
    case kF16: return block_impl<T, kF16>(q, r0, r1, c0, c1, out, ld);
    case kBF16F16: return block_impl<T, kBF16F16>(q, r0, r1, c0, c1, out, ld);
    default: return block_impl<T, kNone>(q, r0, r1, c0, c1, out, ld);
  }
}

int64_t down16(int64_t v) { return v >= 16 ? v - v % 16 : v; }

void check_activation(const at::Tensor& a, int64_t width, const QuantWeight& q, const char* name) {
  TORCH_CHECK(a.device().is_cpu(), "fastpeft_cpp quant: ", name, " must be a CPU tensor, got one on ", a.device());
  TORCH_CHECK(a.dim() == 2 && a.size(1) == width, "fastpeft_cpp quant: ", name, " must be [M, ", width,
              "] for a [", q.n, ", ", q.k, "] weight, got ", a.sizes());
  const auto d = a.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, "fastpeft_cpp quant: ", name,
              " must be float32, bfloat16 or float16, got ", d);
}

#define FASTPEFT_QUANT_DISPATCH(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

}  // namespace

template <typename T>
void dequantize_block(const QuantWeight& q, int64_t r0, int64_t r1, int64_t c0, int64_t c1, T* out, int64_t ld) {
  dequantize_as<T>(q, r0, r1, c0, c1, out, ld, c10::CppTypeToScalarType<T>::value);
}

template void dequantize_block<float>(const QuantWeight&, int64_t, int64_t, int64_t, int64_t, float*, int64_t);
template void dequantize_block<c10::BFloat16>(const QuantWeight&, int64_t, int64_t, int64_t, int64_t,
                                              c10::BFloat16*, int64_t);
template void dequantize_block<c10::Half>(const QuantWeight&, int64_t, int64_t, int64_t, int64_t, c10::Half*,
                                          int64_t);

QuantWeight make_view(const at::Tensor& data, const at::Tensor& absmax, const std::optional<at::Tensor>& absmax2,
                      const std::optional<at::Tensor>& absmax_code, const std::optional<at::Tensor>& absmax_offset,
                      std::string_view format, int64_t n, int64_t k, int64_t blocksize, int64_t absmax_blocksize,
                      at::ScalarType weight_dtype) {
  auto tensor_ok = [](const at::Tensor& t, at::ScalarType dt, int64_t numel, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), "fastpeft_cpp quant: ", name, " must be a CPU tensor, got one on ", t.device());
    TORCH_CHECK(t.scalar_type() == dt, "fastpeft_cpp quant: ", name, " must be ", dt, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "fastpeft_cpp quant: ", name, " must be contiguous");
    TORCH_CHECK(t.numel() == numel, "fastpeft_cpp quant: ", name, " must have ", numel, " elements, got ", t.numel());
  };
  TORCH_CHECK(n >= 0 && k >= 0, "fastpeft_cpp quant: n and k must be >= 0, got ", n, ", ", k);
  TORCH_CHECK(weight_dtype == at::kFloat || weight_dtype == at::kBFloat16 || weight_dtype == at::kHalf,
              "fastpeft_cpp quant: weight_dtype must be float32, bfloat16 or float16, got ", weight_dtype);
  QuantWeight q;
  q.n = n;
  q.k = k;
  q.weight_dtype = weight_dtype;
  if (format == "nf4") {
    q.format = Format::kNF4;
    TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
                "fastpeft_cpp quant: nf4 blocksize must be a power of two in [32, 4096], got ", blocksize);
    q.blocksize = blocksize;
    const int64_t numel = n * k;
    const int64_t nblocks = (numel + blocksize - 1) / blocksize;
    tensor_ok(data, at::kByte, (numel + 1) / 2, "packed");
    q.packed = data.data_ptr<uint8_t>();
    const bool nested = absmax2.has_value() && absmax2->defined();
    if (nested) {
      TORCH_CHECK(absmax_blocksize >= 1, "fastpeft_cpp quant: absmax_blocksize must be >= 1, got ", absmax_blocksize);
      TORCH_CHECK(absmax_code.has_value() && absmax_code->defined() && absmax_offset.has_value() &&
                      absmax_offset->defined(),
                  "fastpeft_cpp quant: double quantization needs absmax2, absmax_code and absmax_offset");
      tensor_ok(absmax, at::kByte, nblocks, "absmax (codes)");
      tensor_ok(*absmax2, at::kFloat, (nblocks + absmax_blocksize - 1) / absmax_blocksize, "absmax2");
      tensor_ok(*absmax_code, at::kFloat, 256, "absmax_code");
      tensor_ok(*absmax_offset, at::kFloat, 1, "absmax_offset");
      q.absmax_q = absmax.data_ptr<uint8_t>();
      q.absmax2 = absmax2->data_ptr<float>();
      q.absmax_code = absmax_code->data_ptr<float>();
      q.absmax_offset = absmax_offset->data_ptr<float>()[0];
      q.absmax_blocksize = absmax_blocksize;
    } else {
      tensor_ok(absmax, at::kFloat, nblocks, "absmax");
      q.absmax = absmax.data_ptr<float>();
    }
  } else if (format == "int8") {
    q.format = Format::kInt8;
    tensor_ok(data, at::kChar, n * k, "CB");
    tensor_ok(absmax, at::kFloat, n, "SCB");
    q.cb = data.data_ptr<int8_t>();
    q.scb = absmax.data_ptr<float>();
  } else {
    TORCH_CHECK(false, "fastpeft_cpp quant: format must be 'nf4' or 'int8', got '", std::string(format), "'");
  }
  return q;
}

namespace {

// out[:, o-block] (+)= a[:, i-block] @ P for every (output block, input block), P the dequantized
// sub-block of W (forward: W[o, i]^T, dX: W[i, o]), in compute type C.  A float32 compute slices
// the contraction (p_in wide) and accumulates in float32; bfloat16 takes the whole contraction in
// one GEMM (one rounding of its fp32 accumulator, as a dense product).  float16 computes in float32
// (ATen's CPU float16 GEMM is slow) on a float32 copy of `a` with panels rounded to float16, so the
// result is that of the float16 product, rounded once.  Output blocks are split so every thread
// gets as many; each works through its own with its own buffer and single-threaded GEMMs.
template <typename T, typename C>
// out = a W^T (forward) or a W, or out += that when `accumulate` (out then holds the other terms).
void panel_gemm(const at::Tensor& a_in, at::Tensor& out, const QuantWeight& q, bool forward, int64_t panel_bytes,
                bool accumulate) {
  const int64_t out_dim = forward ? q.n : q.k, in_dim = forward ? q.k : q.n;
  const int64_t elems = std::max<int64_t>(256, (panel_bytes > 0 ? panel_bytes : kDefaultPanelBytes) /
                                                   static_cast<int64_t>(sizeof(C)));
  constexpr bool kSlice = std::is_same_v<C, float>;
  constexpr bool kWide = !std::is_same_v<C, T>;  // float16 through float32
  const at::ScalarType as = c10::CppTypeToScalarType<T>::value;
  const at::Tensor a = kWide ? a_in.to(at::kFloat) : a_in;
  const int64_t p_in = kSlice ? std::min<int64_t>(in_dim, kSliceWidth) : in_dim;
  int64_t p_out = std::min(out_dim, down16(std::max<int64_t>(1, elems / p_in)));
  const int64_t threads = at::get_num_threads();
  int64_t blocks = (out_dim + p_out - 1) / p_out;
  if (threads > 1 && blocks >= threads && blocks % threads != 0) {  // balance: a multiple of threads
    blocks = (blocks + threads - 1) / threads * threads;
    p_out = std::min(out_dim, down16((out_dim + blocks - 1) / blocks));
    blocks = (out_dim + p_out - 1) / p_out;
  }
  const int64_t in_blocks = (in_dim + p_in - 1) / p_in;
  const at::TensorOptions copts = out.options().dtype(c10::CppTypeToScalarType<C>::value);
  auto run = [&](int64_t first, int64_t last) {
    at::Tensor buf = at::empty({p_out * p_in}, copts);
    at::Tensor acc = kWide ? at::empty({a.size(0), p_out}, copts) : at::Tensor();
    C* ptr = buf.data_ptr<C>();
    for (int64_t ob = first; ob < last; ++ob) {
      const int64_t o0 = ob * p_out, o1 = std::min(out_dim, o0 + p_out), wo = o1 - o0;
      at::Tensor dst = kWide ? acc.narrow(1, 0, wo) : out.narrow(1, o0, wo);
      for (int64_t ib = 0; ib < in_blocks; ++ib) {
        const int64_t i0 = ib * p_in, i1 = std::min(in_dim, i0 + p_in), wi = i1 - i0;
        at::Tensor src = a.narrow(1, i0, wi);
        at::Tensor panel;
        if (forward) {  // W[o0:o1, i0:i1] as [wo, wi], used transposed
          dequantize_as<C>(q, o0, o1, i0, i1, ptr, wi, as);
          panel = buf.narrow(0, 0, wo * wi).view({wo, wi}).t();
        } else {  // W[i0:i1, o0:o1] as [wi, wo]
          dequantize_as<C>(q, i0, i1, o0, o1, ptr, wo, as);
          panel = buf.narrow(0, 0, wi * wo).view({wi, wo});
        }
        if (ib == 0 && (kWide || !accumulate)) {
          at::mm_out(dst, src, panel);
        } else {
          dst.addmm_(src, panel);
        }
      }
      if (kWide) {
        if (accumulate) out.narrow(1, o0, wo).add_(dst);
        else out.narrow(1, o0, wo).copy_(dst);
      }
    }
  };
  if (threads > 1 && blocks >= threads && !at::in_parallel_region()) {
    at::parallel_for(0, blocks, 1, run);  // each thread: whole blocks, single-threaded GEMMs
  } else {
    run(0, blocks);  // few blocks: in turn, the GEMMs use every thread
  }
}

template <typename T>
void panel_gemm_for(const at::Tensor& a, at::Tensor& out, const QuantWeight& q, bool forward, int64_t panel_bytes,
                    bool accumulate = false) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    panel_gemm<T, float>(a, out, q, forward, panel_bytes, accumulate);
  } else {
    panel_gemm<T, T>(a, out, q, forward, panel_bytes, accumulate);
  }
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const QuantWeight& q, int64_t panel_bytes) {
  check_activation(x, q.k, q, "x");
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal GEMMs: plain kernels, no graph
  at::Tensor y = at::empty({x.size(0), q.n}, x.options());
  if (x.size(0) == 0 || q.n == 0) return y;
  if (q.k == 0) return y.zero_();
  FASTPEFT_QUANT_DISPATCH(x.scalar_type(), "fastpeft_cpp::quant_linear",
                          [&] { panel_gemm_for<scalar_t>(x, y, q, /*forward=*/true, panel_bytes); });
  return y;
}

at::Tensor linear_grad_input(const at::Tensor& grad_y, const QuantWeight& q, int64_t panel_bytes) {
  check_activation(grad_y, q.n, q, "grad_y");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor dx = at::empty({grad_y.size(0), q.k}, grad_y.options());
  if (grad_y.size(0) == 0 || q.k == 0) return dx;
  if (q.n == 0) return dx.zero_();
  FASTPEFT_QUANT_DISPATCH(grad_y.scalar_type(), "fastpeft_cpp::quant_linear_grad_input",
                          [&] { panel_gemm_for<scalar_t>(grad_y, dx, q, /*forward=*/false, panel_bytes); });
  return dx;
}

void linear_add_(at::Tensor& out, const at::Tensor& a, const QuantWeight& q, bool forward, int64_t panel_bytes) {
  const int64_t in_dim = forward ? q.k : q.n, out_dim = forward ? q.n : q.k;
  check_activation(a, in_dim, q, forward ? "x" : "grad_y");
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.dim() == 2 && out.size(0) == a.size(0) &&
                  out.size(1) == out_dim && out.scalar_type() == a.scalar_type(),
              "fastpeft_cpp quant: out must be a contiguous CPU tensor [", a.size(0), ", ", out_dim, "] of ",
              a.scalar_type(), ", got ", out.scalar_type(), " ", out.sizes());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (a.size(0) == 0 || out_dim == 0 || in_dim == 0) return;
  FASTPEFT_QUANT_DISPATCH(a.scalar_type(), "fastpeft_cpp::quant_linear_add_",
                          [&] { panel_gemm_for<scalar_t>(a, out, q, forward, panel_bytes, /*accumulate=*/true); });
}

namespace {

using OptT = std::optional<at::Tensor>;

void quant_linear_add_op(at::Tensor out, const at::Tensor& a, const at::Tensor& data, const at::Tensor& absmax,
                         const OptT& absmax2, const OptT& absmax_code, const OptT& absmax_offset,
                         c10::string_view format, int64_t n, int64_t k, int64_t blocksize, int64_t absmax_blocksize,
                         at::ScalarType weight_dtype, bool forward, int64_t panel_bytes) {
  QuantWeight q = make_view(data, absmax, absmax2, absmax_code, absmax_offset,
                            std::string_view(format.data(), format.size()), n, k, blocksize, absmax_blocksize,
                            weight_dtype);
  linear_add_(out, a, q, forward, panel_bytes);
}

at::Tensor quant_linear_op(const at::Tensor& x, const at::Tensor& data, const at::Tensor& absmax, const OptT& absmax2,
                           const OptT& absmax_code, const OptT& absmax_offset, c10::string_view format, int64_t n,
                           int64_t k, int64_t blocksize, int64_t absmax_blocksize, at::ScalarType weight_dtype,
                           int64_t panel_bytes) {
  QuantWeight q = make_view(data, absmax, absmax2, absmax_code, absmax_offset,
                            std::string_view(format.data(), format.size()), n, k, blocksize, absmax_blocksize,
                            weight_dtype);
  return linear(x, q, panel_bytes);
}

at::Tensor quant_linear_grad_input_op(const at::Tensor& grad_y, const at::Tensor& data, const at::Tensor& absmax,
                                      const OptT& absmax2, const OptT& absmax_code, const OptT& absmax_offset,
                                      c10::string_view format, int64_t n, int64_t k, int64_t blocksize,
                                      int64_t absmax_blocksize, at::ScalarType weight_dtype, int64_t panel_bytes) {
  QuantWeight q = make_view(data, absmax, absmax2, absmax_code, absmax_offset,
                            std::string_view(format.data(), format.size()), n, k, blocksize, absmax_blocksize,
                            weight_dtype);
  return linear_grad_input(grad_y, q, panel_bytes);
}

void quant_dequantize_op(const at::Tensor& data, const at::Tensor& absmax, const OptT& absmax2,
                         const OptT& absmax_code, const OptT& absmax_offset, c10::string_view format, int64_t n,
                         int64_t k, int64_t blocksize, int64_t absmax_blocksize, at::ScalarType weight_dtype,
                         int64_t row_start, int64_t row_stop, int64_t col_start, int64_t col_stop,
                         const at::Tensor& out) {
  QuantWeight q = make_view(data, absmax, absmax2, absmax_code, absmax_offset,
                            std::string_view(format.data(), format.size()), n, k, blocksize, absmax_blocksize,
                            weight_dtype);
  TORCH_CHECK(0 <= row_start && row_start <= row_stop && row_stop <= n && 0 <= col_start && col_start <= col_stop &&
                  col_stop <= k,
              "fastpeft_cpp quant: rows [", row_start, ", ", row_stop, ") and columns [", col_start, ", ", col_stop,
              ") must lie in [", n, ", ", k, "]");
  const int64_t rows = row_stop - row_start, cols = col_stop - col_start;
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.dim() == 2 && out.size(0) == rows &&
                  out.size(1) == cols,
              "fastpeft_cpp quant: out must be a contiguous CPU tensor [", rows, ", ", cols, "], got ", out.sizes());
  FASTPEFT_QUANT_DISPATCH(out.scalar_type(), "fastpeft_cpp::quant_dequantize", [&] {
    scalar_t* base = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, cols));
    at::parallel_for(0, rows, grain, [&](int64_t a, int64_t b) {
      dequantize_block<scalar_t>(q, row_start + a, row_start + b, col_start, col_stop, base + a * cols, cols);
    });
  });
}

at::Tensor quant_linear_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, const OptT&, const OptT&,
                             const OptT&, c10::string_view, int64_t n, int64_t, int64_t, int64_t, at::ScalarType,
                             int64_t) {
  return at::empty({x.size(0), n}, x.options());
}

at::Tensor quant_linear_grad_input_meta(const at::Tensor& grad_y, const at::Tensor&, const at::Tensor&, const OptT&,
                                        const OptT&, const OptT&, c10::string_view, int64_t, int64_t k, int64_t,
                                        int64_t, at::ScalarType, int64_t) {
  return at::empty({grad_y.size(0), k}, grad_y.options());
}

}  // namespace
}  // namespace quant
}  // namespace fastpeft

#define FASTPEFT_QUANT_WEIGHT_ARGS                                                                   \
  "Tensor data, Tensor absmax, Tensor? absmax2, Tensor? absmax_code, Tensor? absmax_offset, str format, " \
  "int n, int k, int blocksize, int absmax_blocksize, ScalarType weight_dtype"

TORCH_LIBRARY_FRAGMENT(FASTPEFT_QUANT_NAMESPACE, m) {
  // y [M, n] = x [M, k] W^T and dX [M, k] = grad_y [M, n] W for a quantized W (nf4: data = packed,
  // absmax = fp32 absmax or, with absmax2 given, its uint8 codes; int8: data = CB, absmax = SCB),
  // dequantizing one panel of ~panel_bytes (0: 1 MiB) at a time.
  m.def("quant_linear(Tensor x, " FASTPEFT_QUANT_WEIGHT_ARGS ", int panel_bytes=0) -> Tensor");
  m.def("quant_linear_grad_input(Tensor grad_y, " FASTPEFT_QUANT_WEIGHT_ARGS ", int panel_bytes=0) -> Tensor");
  // out += a W^T (forward) or a W (the frozen GEMM accumulating onto the other terms of the fused op).
  m.def("quant_linear_add_(Tensor(a!) out, Tensor a, " FASTPEFT_QUANT_WEIGHT_ARGS
        ", bool forward, int panel_bytes=0) -> ()");
  // W[row_start:row_stop, col_start:col_stop] into out (contiguous, float32 / bfloat16 / float16).
  m.def("quant_dequantize(" FASTPEFT_QUANT_WEIGHT_ARGS
        ", int row_start, int row_stop, int col_start, int col_stop, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(FASTPEFT_QUANT_NAMESPACE, CPU, m) {
  m.impl("quant_linear", &fastpeft::quant::quant_linear_op);
  m.impl("quant_linear_grad_input", &fastpeft::quant::quant_linear_grad_input_op);
  m.impl("quant_dequantize", &fastpeft::quant::quant_dequantize_op);
  m.impl("quant_linear_add_", &fastpeft::quant::quant_linear_add_op);
}

TORCH_LIBRARY_IMPL(FASTPEFT_QUANT_NAMESPACE, Meta, m) {
  m.impl("quant_linear", &fastpeft::quant::quant_linear_meta);
  m.impl("quant_linear_grad_input", &fastpeft::quant::quant_linear_grad_input_meta);
}
