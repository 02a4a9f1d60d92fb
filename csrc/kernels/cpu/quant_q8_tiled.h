// quant_q8_tiled.h — gemm_q8_tiled and q8_tiled_rows (quant_blocks.h): weight rows against x in
// tiles of 16 rows (Q8Tiles: codes + 128 as unsigned bytes, four columns of a row together). Not a
// header of its own: quant_q8_impl.cpp includes it twice in every ISA's build, after its decoders,
// as namespace `vnni` (CF_TILED_VNNI 1: every kernel compiled for AVX-512 VNNI / AVX-VNNI, so
// callable only where the CPU has it, which linear.cpp checks) and `plain` (CF_TILED_VNNI 0).
//
// The codes of a weight row are decoded once per product, kQ8TileRows rows at a time, into a small
// scratch. Per four columns, 16 rows' unsigned bytes times the row's four codes (broadcast) are
// added to each row's int32 lane: one vpdpbusd (VNNI), or vpmaddubsw (int16 pair sums, added over
// kFold four-column steps) then vpmaddwd by ones (plain: only the types whose largest code
// kMaxCode keeps 2 * 255 * kMaxCode, times kFold, within int16 — all but Q8_0, IQ4_NL and IQ4_XS).
// Per run of codes sharing a scale s (16 or 32 columns; a whole 32-block) the lanes start at 0 and
// are added times s; per block the +128 adds 128 sum_g s_g sum(c in g), subtracted as `corr`, and
// the offsets M sum_g m_g sum(q in g) come from x's group sums (int16 pairs, vpdpwssd / vpmaddwd).
// The sums are the row kernels' (quant_q8_impl.cpp's header), so the result is the same: the
// dequantized matrix times rounded x. AVX2 builds take a tile as two halves of 8 rows.

// AVX-VNNI needs GCC 11 / clang 12: older compilers build the AVX2 `vnni` namespace as `plain`
// (correct, and its q8_tiled_rows says so).
#if CF_TILED_VNNI && (defined(CF_Q8_AVX512) || (defined(__clang__) && __clang_major__ >= 12) || \
                      (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define CF_TILED_USE_VNNI 1
#else
#define CF_TILED_USE_VNNI 0
#endif
#if CF_TILED_USE_VNNI && defined(CF_Q8_AVX512)
#define CF_TILED_FN __attribute__((target("avx512vnni")))
#elif CF_TILED_USE_VNNI
#define CF_TILED_FN __attribute__((target("avxvnni")))
#else
#define CF_TILED_FN
#endif

#ifdef CF_Q8_VECTOR
#ifdef CF_Q8_AVX512
using VecI = __m512i;
using VecF = __m512;
#define CF_V(op) _mm512_##op
CF_TILED_FN inline VecI load_i(const void* p) { return _mm512_loadu_si512(p); }
CF_TILED_FN inline VecI zero_i() { return _mm512_setzero_si512(); }
CF_TILED_FN inline void store_i(void* p, VecI v) { _mm512_storeu_si512(p, v); }
#if CF_TILED_USE_VNNI
CF_TILED_FN inline VecI dot4(VecI acc, VecI u, VecI s) { return _mm512_dpbusd_epi32(acc, u, s); }
CF_TILED_FN inline VecI dot2(VecI acc, VecI a, VecI b) { return _mm512_dpwssd_epi32(acc, a, b); }
#endif
#else
using VecI = __m256i;
using VecF = __m256;
#define CF_V(op) _mm256_##op
CF_TILED_FN inline VecI load_i(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
CF_TILED_FN inline VecI zero_i() { return _mm256_setzero_si256(); }
CF_TILED_FN inline void store_i(void* p, VecI v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
#if CF_TILED_USE_VNNI
CF_TILED_FN inline VecI dot4(VecI acc, VecI u, VecI s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
CF_TILED_FN inline VecI dot2(VecI acc, VecI a, VecI b) { return _mm256_dpwssd_avx_epi32(acc, a, b); }
#endif
#endif
constexpr int64_t kVecLanes = sizeof(VecF) / 4;  // rows of a tile per vector
#if !CF_TILED_USE_VNNI
CF_TILED_FN inline VecI dot2(VecI acc, VecI a, VecI b) { return CF_V(add_epi32)(acc, CF_V(madd_epi16)(a, b)); }
#endif

// One weight row's block: D, M, the +128 correction; a 256-block's scales s_g (int32, broadcast to
// runs) and offsets m_g (int16 pairs, broadcast to the offsets' products); the 32-blocks' s = 1 and
// m = (1, 1) are implied (16 bytes a block, so that their terms stay in L1 beside x).
template <int64_t Block>
struct alignas(16) BlockTerms {
  float D, M;
  int32_t corr, unused;
};
template <>
struct alignas(16) BlockTerms<256> {
  float D, M;
  int32_t corr, unused;
  int32_t s[16];
  int16_t m[16];
};
static_assert(sizeof(BlockTerms<256>) <= 128 && sizeof(BlockTerms<32>) <= 128,
              "q8_tiled_scratch_bytes keeps 128 bytes a block");

template <int32_t Type>
constexpr int64_t kTileBlock = q8_k_type(Type) ? 256 : 32;
// Codes per run with one scale: Q4_K / Q5_K / IQ4_XS's 32-runs, the other K-quants' 16, a 32-block.
template <int32_t Type>
constexpr int kRunCodes = Type == kQ6K || Type == kQ3K || Type == kQ2K ? 16 : 32;
template <int32_t Type>
constexpr bool kTileOffsets = q8_k_type(Type) ? kOffsets<Type> : !kSignedCodes<Type>;
// The largest |code| the decoders give (Q6_K / Q3_K unsigned, their offsets in m).
template <int32_t Type>
constexpr int kMaxCode = Type == kQ8_0 ? 128 : Type == kIQ4NL || Type == kIQ4XS ? 127 : Type == kQ6K ? 63
                         : Type == kQ5K || Type == kQ5_1 ? 31 : Type == kQ5_0 ? 16 : Type == kQ4_0 ? 8
                         : Type == kQ3K ? 7 : Type == kQ2K ? 3 : 15;
// Four-column steps whose vpmaddubsw pair sums (each at most 2 * 255 * kMaxCode) add in int16
// before widening (plain); 0: even one could saturate, so the type has no plain tiled kernel.
template <int32_t Type>
constexpr int fold() {
  int f = 0;
  for (int n = 1; n <= kRunCodes<Type> / 4 && n * 2 * 255 * kMaxCode<Type> <= 32767; n *= 2) f = n;
  return f;
}
template <int32_t Type>
constexpr int kFold = CF_TILED_USE_VNNI ? 1 : fold<Type>();

inline int32_t hsum_epi32(__m256i v) {
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i t = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 1)));
}

// Four-code sums of c (int32 lanes) and their total.
CF_TILED_FN inline VecI sum4(VecI c) {
#if CF_TILED_USE_VNNI
  return dot4(zero_i(), CF_V(set1_epi8)(1), c);
#else
  return CF_V(madd_epi16)(CF_V(maddubs_epi16)(CF_V(set1_epi8)(1), c), CF_V(set1_epi16)(1));
#endif
}
CF_TILED_FN inline int32_t total(VecI v) {
#ifdef CF_Q8_AVX512
  return _mm512_reduce_add_epi32(v);
#else
  return hsum_epi32(v);
#endif
}

// A 256-block's codes into `codes` (element order) and sum_g s_g sum(c in g) for its `corr`:
// kVecLanes * 4 codes at a time, lane j's four codes of group (4 j / 16) of the step. The scales
// are widened from v again rather than loaded from the BlockTerms just stored: that load right
// after the stores cost the 256-blocks a third of their speed at 12-16 rows (measured).
template <int32_t Type>
CF_TILED_FN int32_t decode_k_block(const uint8_t* b, const VScales& v, int8_t* codes) {
  constexpr int kStep = 4 * kVecLanes;  // codes a vector
  const VecI quarter = CF_V(srli_epi32)(CF_V(setr_epi32)(0, 1, 2, 3, 4, 5, 6, 7
#ifdef CF_Q8_AVX512
                                                         , 8, 9, 10, 11, 12, 13, 14, 15
#endif
                                                         ), 2);
#ifdef CF_Q8_AVX512
  const VecI s = _mm512_cvtepi16_epi32(v.s);
#else
  const VecI lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v.s));
  const VecI hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(v.s, 1));
#endif
  VecI corr = zero_i();
  for (int k = 0; k < 256 / kStep; ++k) {
#ifdef CF_Q8_AVX512
    const VecI c = codes64<Type>(b, k);
    const VecI scale = _mm512_permutexvar_epi32(CF_V(add_epi32)(quarter, CF_V(set1_epi32)(4 * k)), s);
#else
    const VecI c = codes32k<Type>(b, k);  // groups 2 k, 2 k + 1
    const VecI at = CF_V(add_epi32)(quarter, CF_V(set1_epi32)(2 * (k % 4)));
    const VecI scale = _mm256_permutevar8x32_epi32(k < 4 ? lo : hi, at);
#endif
    store_i(codes + kStep * k, c);
    corr = CF_V(add_epi32)(corr, CF_V(mullo_epi32)(sum4(c), scale));
  }
  return total(corr);
}

// Weight row `row`'s codes (K int8, element order) and block terms into scratch.
template <int32_t Type>
CF_TILED_FN void decode_row(const uint8_t* row, int64_t K, int8_t* codes, BlockTerms<kTileBlock<Type>>* terms) {
  constexpr int64_t kBlock = kTileBlock<Type>, kBytes = block_bytes(Type);
  for (int64_t i = 0; i < K / kBlock; ++i) {
    const uint8_t* b = row + i * kBytes;
    BlockTerms<kBlock>& t = terms[i];
    if constexpr (kBlock == 256) {
      const VScales v = vscales<Type>(b);
      t.D = v.D, t.M = kOffsets<Type> ? v.M : 0.0f;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.s), _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v.s)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.s + 8), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(v.s, 1)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.m), v.m);
      t.corr = 128 * decode_k_block<Type>(b, v, codes + i * 256);
    } else {
      const __m256i c = codes32<Type>(b);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i * 32), c);
      t.D = half_at(b), t.M = kTileOffsets<Type> ? -half_at(b + 2) : 0.0f;
      t.corr = 128 * hsum_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), c), _mm256_set1_epi16(1)));
    }
  }
}

// One run's products: sum over kRun four-column steps from dword dw of x's lanes times R rows' codes.
template <int32_t Type, int R>
CF_TILED_FN inline void run_dot(const uint8_t* xq, int64_t dw, const int8_t* codes, int64_t K, VecI* a) {
  constexpr int kRun = kRunCodes<Type> / 4;
  for (int r = 0; r < R; ++r) a[r] = zero_i();
#pragma GCC unroll 8
  for (int j = 0; j < kRun; j += kFold<Type>) {
#if !CF_TILED_USE_VNNI
    VecI p[R];
#endif
#pragma GCC unroll 8
    for (int f = 0; f < kFold<Type>; ++f) {
      const VecI v = load_i(xq + (dw + j + f) * 4 * kQ8Lanes);
      for (int r = 0; r < R; ++r) {
        int32_t c;
        __builtin_memcpy(&c, codes + r * K + 4 * (dw + j + f), 4);
#if CF_TILED_USE_VNNI
        a[r] = dot4(a[r], v, CF_V(set1_epi32)(c));
#else
        const VecI m = CF_V(maddubs_epi16)(v, CF_V(set1_epi32)(c));
        p[r] = f == 0 ? m : CF_V(add_epi16)(p[r], m);
#endif
      }
    }
#if !CF_TILED_USE_VNNI
    for (int r = 0; r < R; ++r) a[r] = CF_V(add_epi32)(a[r], CF_V(madd_epi16)(p[r], CF_V(set1_epi16)(1)));
#endif
  }
}

// Rows [h, h + kVecLanes) of tile t of x against R decoded weight rows (codes R x K, terms R x
// blocks): out[r * kQ8Lanes + h + l].
template <int32_t Type, int R>
CF_TILED_FN void tile_dot(const Q8Tiles& x, int64_t t, int64_t h, const int8_t* codes,
                          const BlockTerms<kTileBlock<Type>>* terms, float* out) {
  constexpr int64_t kBlock = kTileBlock<Type>, kPairs = kBlock / 32;
  constexpr int kRun = kRunCodes<Type> / 4;  // dwords
  const int64_t K = x.K, blocks = K / kBlock;
  const uint8_t* xq = x.q + t * K * kQ8Lanes + 4 * h;
  const int32_t* xs = x.sums + t * blocks * kPairs * kQ8Lanes + h;
  const float* xd = x.d + t * blocks * kQ8Lanes + h;
  VecF f[R];
  for (int r = 0; r < R; ++r) f[r] = CF_V(setzero_ps)();
  for (int64_t i = 0; i < blocks; ++i) {
    VecI S[R], O[R];
    for (int r = 0; r < R; ++r) S[r] = O[r] = zero_i();
#pragma GCC unroll 2
    for (int g = 0; g < kBlock / 4 / kRun; ++g) {
      VecI a[R];
      run_dot<Type, R>(xq, i * (kBlock / 4) + g * kRun, codes, K, a);
      for (int r = 0; r < R; ++r) {
        if constexpr (kBlock == 256)
          S[r] = CF_V(add_epi32)(S[r],
                                 CF_V(mullo_epi32)(a[r], CF_V(set1_epi32)(terms[r * blocks + i].s[g * kRun / 4])));
        else
          S[r] = a[r];
      }
    }
    if constexpr (kTileOffsets<Type>)
      for (int64_t p = 0; p < kPairs; ++p) {
        const VecI v = load_i(xs + (i * kPairs + p) * kQ8Lanes);
        for (int r = 0; r < R; ++r) {
          int32_t m = 0x00010001;
          if constexpr (kBlock == 256) __builtin_memcpy(&m, terms[r * blocks + i].m + 2 * p, 4);
          O[r] = dot2(O[r], v, CF_V(set1_epi32)(m));
        }
      }
    const VecF dx = CF_V(loadu_ps)(xd + i * kQ8Lanes);
    for (int r = 0; r < R; ++r) {
      const BlockTerms<kBlock>& bt = terms[r * blocks + i];
      VecF v = CF_V(mul_ps)(CF_V(cvtepi32_ps)(CF_V(sub_epi32)(S[r], CF_V(set1_epi32)(bt.corr))), CF_V(set1_ps)(bt.D));
      if constexpr (kTileOffsets<Type>) v = CF_V(fnmadd_ps)(CF_V(cvtepi32_ps)(O[r]), CF_V(set1_ps)(bt.M), v);
      f[r] = CF_V(fmadd_ps)(v, dx, f[r]);
    }
  }
  for (int r = 0; r < R; ++r) CF_V(storeu_ps)(out + kQ8Lanes * r + h, f[r]);
}

// Weight rows [n0, n1) against every tile of x, kQ8TileRows rows decoded at a time.
template <int32_t Type>
CF_TILED_FN void tiled_rows(const Q8Tiles& x, const uint8_t* w, int64_t row_bytes, const float* bias, float* y,
                            int64_t ldy, int64_t n0, int64_t n1, uint8_t* scratch) {
  const int64_t K = x.K, blocks = K / kTileBlock<Type>;
  int8_t* codes = reinterpret_cast<int8_t*>(scratch);
  auto* terms = reinterpret_cast<BlockTerms<kTileBlock<Type>>*>(scratch + kQ8TileRows * K);
  alignas(64) float out[kQ8TileRows * kQ8Lanes];
  for (int64_t n = n0; n < n1; n += kQ8TileRows) {
    const int64_t R = n1 - n < kQ8TileRows ? n1 - n : kQ8TileRows;
    for (int64_t r = 0; r < R; ++r) decode_row<Type>(w + (n + r) * row_bytes, K, codes + r * K, terms + r * blocks);
    for (int64_t t = 0; t < x.tiles; ++t) {
      for (int64_t h = 0; h < kQ8Lanes; h += kVecLanes) {
        switch (R) {
          case 1: tile_dot<Type, 1>(x, t, h, codes, terms, out); break;
          case 2: tile_dot<Type, 2>(x, t, h, codes, terms, out); break;
          case 3: tile_dot<Type, 3>(x, t, h, codes, terms, out); break;
          default: tile_dot<Type, 4>(x, t, h, codes, terms, out); break;
        }
      }
      const int64_t lanes = x.M - t * kQ8Lanes < kQ8Lanes ? x.M - t * kQ8Lanes : kQ8Lanes;
      for (int64_t l = 0; l < lanes; ++l)
        for (int64_t r = 0; r < R; ++r)
          y[(t * kQ8Lanes + l) * ldy + n + r] = out[r * kQ8Lanes + l] + (bias != nullptr ? bias[n + r] : 0.0f);
    }
  }
}
#undef CF_V
#endif  // CF_Q8_VECTOR

// Whether this build's kernels of this namespace take `type` (a q8 type whose codes they can sum).
inline bool tiled_type(int32_t type) {
#ifdef CF_Q8_VECTOR
  switch (type) {
#define CF_TAKES(T) \
  case T: return kFold<T> > 0;
    CF_TAKES(kQ4_0) CF_TAKES(kQ4_1) CF_TAKES(kQ5_0) CF_TAKES(kQ5_1) CF_TAKES(kQ8_0) CF_TAKES(kIQ4NL)
    CF_TAKES(kQ2K) CF_TAKES(kQ3K) CF_TAKES(kQ4K) CF_TAKES(kQ5K) CF_TAKES(kQ6K) CF_TAKES(kIQ4XS)
#undef CF_TAKES
    default: return false;
  }
#else
  (void)type;
  return false;
#endif
}

void gemm_q8_tiled(int32_t type, const Q8Tiles& x, const uint8_t* w, int64_t row_bytes, const float* bias, float* y,
                   int64_t ldy, int64_t n0, int64_t n1, uint8_t* scratch) {
#ifdef CF_Q8_VECTOR
  switch (type) {
#define CF_TILED(T) \
  case T: if constexpr (kFold<T> > 0) tiled_rows<T>(x, w, row_bytes, bias, y, ldy, n0, n1, scratch); break;
    CF_TILED(kQ4_0) CF_TILED(kQ4_1) CF_TILED(kQ5_0) CF_TILED(kQ5_1) CF_TILED(kQ8_0) CF_TILED(kIQ4NL)
    CF_TILED(kQ2K) CF_TILED(kQ3K) CF_TILED(kQ4K) CF_TILED(kQ5K) CF_TILED(kQ6K) CF_TILED(kIQ4XS)
#undef CF_TILED
    default: break;
  }
#else
  (void)type, (void)x, (void)w, (void)row_bytes, (void)bias, (void)y, (void)ldy, (void)n0, (void)n1, (void)scratch;
#endif
}

int64_t q8_tiled_rows(int32_t type) {
#ifdef CF_Q8_AVX512
  constexpr bool kWide = true;
#else
  constexpr bool kWide = false;
#endif
  return tiled_type(type) ? q8_tiled_from(type, CF_TILED_USE_VNNI != 0, kWide) : 0;
}

#undef CF_TILED_FN
#undef CF_TILED_USE_VNNI
