/* The XNOR-popcount GEMM micro-kernels over im2col bits (portable, POPCNT, AVX2, AVX2 + POPCNT
 * hybrid, one-word AVX2, AVX-512 VPOPCNTDQ) and their selection. */
#include "bitconv.h"

/* ---- micro-kernels: P[j*ldp + i] = popcount(A[i] XOR W[:, j]) for npix <= PB pixels, OB outputs ---- */

BZ_INLINE void mk_scalar_body(const u64 *A, int64_t lda, int npix, const u64 *Wb, int64_t LW,
                              int32_t *P, int64_t ldp) {
    for (int i = 0; i < npix; ++i) {
        int32_t acc[OB] = {0};
        const u64 *ai = A + i * lda;
        for (int64_t k = 0; k < LW; ++k) {
            const u64 av = ai[k];
            const u64 *wk = Wb + k * OB;
            for (int j = 0; j < OB; ++j) acc[j] += (int32_t)__builtin_popcountll(av ^ wk[j]);
        }
        for (int j = 0; j < OB; ++j) P[j * ldp + i] = acc[j];
    }
}

static void mk_generic(const u64 *A, int64_t lda, int npix, const u64 *Wb, int64_t LW, int32_t *P,
                       int64_t ldp) {
    mk_scalar_body(A, lda, npix, Wb, LW, P, ldp);
}

#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("popcnt"))) static void mk_popcnt(const u64 *A, int64_t lda, int npix,
                                                          const u64 *Wb, int64_t LW, int32_t *P,
                                                          int64_t ldp) {
    mk_scalar_body(A, lda, npix, Wb, LW, P, ldp);
}

/* AVX2: one vector = one 64-bit word of 4 output channels; bytes counted with a nibble LUT and
 * summed per 64-bit lane by VPSADBW, so no horizontal reduction is needed. */
/* the nibble-LUT constants (declared in each AVX2 kernel) and the bit count of each byte of x */
#define BZ_LUT_CONSTANTS                                                                       \
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,       \
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);      \
    const __m256i low = _mm256_set1_epi8(0x0f)
#define BZ_BYTE_COUNTS(x)                                                                      \
    _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(x, low)),                        \
                    _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), low)))
#define BZ_CNT(acc, av, wv)                                                                    \
    do {                                                                                       \
        const __m256i x_ = _mm256_xor_si256(av, wv);                                           \
        acc = _mm256_add_epi8(acc, BZ_BYTE_COUNTS(x_));                                        \
    } while (0)

__attribute__((target("avx2,popcnt"))) static void mk_avx2(const u64 *A, int64_t lda, int npix,
                                                            const u64 *Wb, int64_t LW, int32_t *P,
                                                            int64_t ldp) {
    if (npix != PB) {
        mk_scalar_body(A, lda, npix, Wb, LW, P, ldp);
        return;
    }
    BZ_LUT_CONSTANTS;
    const __m256i zero = _mm256_setzero_si256();
    __m256i s00 = zero, s01 = zero, s10 = zero, s11 = zero, s20 = zero, s21 = zero, s30 = zero,
            s31 = zero;
    for (int64_t k0 = 0; k0 < LW; k0 += 31) { /* bytes hold at most 31 * 8 = 248 */
        const int64_t k1 = (k0 + 31) < LW ? (k0 + 31) : LW;
        __m256i b00 = zero, b01 = zero, b10 = zero, b11 = zero;
        __m256i b20 = zero, b21 = zero, b30 = zero, b31 = zero;
        for (int64_t k = k0; k < k1; ++k) {
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(Wb + k * OB));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(Wb + k * OB + 4));
            const __m256i a0 = _mm256_set1_epi64x((long long)A[k]);
            BZ_CNT(b00, a0, w0);
            BZ_CNT(b01, a0, w1);
            const __m256i a1 = _mm256_set1_epi64x((long long)A[lda + k]);
            BZ_CNT(b10, a1, w0);
            BZ_CNT(b11, a1, w1);
            const __m256i a2 = _mm256_set1_epi64x((long long)A[2 * lda + k]);
            BZ_CNT(b20, a2, w0);
            BZ_CNT(b21, a2, w1);
            const __m256i a3 = _mm256_set1_epi64x((long long)A[3 * lda + k]);
            BZ_CNT(b30, a3, w0);
            BZ_CNT(b31, a3, w1);
        }
        s00 = _mm256_add_epi64(s00, _mm256_sad_epu8(b00, zero));
        s01 = _mm256_add_epi64(s01, _mm256_sad_epu8(b01, zero));
        s10 = _mm256_add_epi64(s10, _mm256_sad_epu8(b10, zero));
        s11 = _mm256_add_epi64(s11, _mm256_sad_epu8(b11, zero));
        s20 = _mm256_add_epi64(s20, _mm256_sad_epu8(b20, zero));
        s21 = _mm256_add_epi64(s21, _mm256_sad_epu8(b21, zero));
        s30 = _mm256_add_epi64(s30, _mm256_sad_epu8(b30, zero));
        s31 = _mm256_add_epi64(s31, _mm256_sad_epu8(b31, zero));
    }
    int64_t t[PB][OB];
    _mm256_storeu_si256((__m256i *)t[0], s00);
    _mm256_storeu_si256((__m256i *)(t[0] + 4), s01);
    _mm256_storeu_si256((__m256i *)t[1], s10);
    _mm256_storeu_si256((__m256i *)(t[1] + 4), s11);
    _mm256_storeu_si256((__m256i *)t[2], s20);
    _mm256_storeu_si256((__m256i *)(t[2] + 4), s21);
    _mm256_storeu_si256((__m256i *)t[3], s30);
    _mm256_storeu_si256((__m256i *)(t[3] + 4), s31);
    for (int j = 0; j < OB; ++j)
        for (int i = 0; i < PB; ++i) P[j * ldp + i] = (int32_t)t[i][j];
}

/* AVX2 for four pixels while the scalar POPCNT units count a fifth: the two kinds of units work
 * in parallel, so five pixels cost little more than four */
__attribute__((target("avx2,popcnt"))) static void mk_avx2_hybrid(const u64 *A, int64_t lda, int npix,
                                                                   const u64 *Wb, int64_t LW, int32_t *P,
                                                                   int64_t ldp) {
    if (npix != 5) {
        if (npix == 4) mk_avx2(A, lda, npix, Wb, LW, P, ldp);
        else mk_scalar_body(A, lda, npix, Wb, LW, P, ldp);
        return;
    }
    BZ_LUT_CONSTANTS;
    const __m256i zero = _mm256_setzero_si256();
    __m256i s00 = zero, s01 = zero, s10 = zero, s11 = zero, s20 = zero, s21 = zero, s30 = zero,
            s31 = zero;
    uint64_t c0 = 0, c1 = 0, c2 = 0, c3 = 0, c4 = 0, c5 = 0, c6 = 0, c7 = 0;
    const u64 *a4 = A + 4 * lda;
    for (int64_t k0 = 0; k0 < LW; k0 += 31) {
        const int64_t k1 = (k0 + 31) < LW ? (k0 + 31) : LW;
        __m256i b00 = zero, b01 = zero, b10 = zero, b11 = zero;
        __m256i b20 = zero, b21 = zero, b30 = zero, b31 = zero;
        for (int64_t k = k0; k < k1; ++k) {
            const u64 *wk = Wb + k * OB;
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)wk);
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wk + 4));
            const u64 v = a4[k];
            const __m256i a0 = _mm256_set1_epi64x((long long)A[k]);
            BZ_CNT(b00, a0, w0);
            BZ_CNT(b01, a0, w1);
            c0 += (uint64_t)__builtin_popcountll(v ^ wk[0]);
            c1 += (uint64_t)__builtin_popcountll(v ^ wk[1]);
            const __m256i a1 = _mm256_set1_epi64x((long long)A[lda + k]);
            BZ_CNT(b10, a1, w0);
            BZ_CNT(b11, a1, w1);
            c2 += (uint64_t)__builtin_popcountll(v ^ wk[2]);
            c3 += (uint64_t)__builtin_popcountll(v ^ wk[3]);
            const __m256i a2 = _mm256_set1_epi64x((long long)A[2 * lda + k]);
            BZ_CNT(b20, a2, w0);
            BZ_CNT(b21, a2, w1);
            c4 += (uint64_t)__builtin_popcountll(v ^ wk[4]);
            c5 += (uint64_t)__builtin_popcountll(v ^ wk[5]);
            const __m256i a3 = _mm256_set1_epi64x((long long)A[3 * lda + k]);
            BZ_CNT(b30, a3, w0);
            BZ_CNT(b31, a3, w1);
            c6 += (uint64_t)__builtin_popcountll(v ^ wk[6]);
            c7 += (uint64_t)__builtin_popcountll(v ^ wk[7]);
        }
        s00 = _mm256_add_epi64(s00, _mm256_sad_epu8(b00, zero));
        s01 = _mm256_add_epi64(s01, _mm256_sad_epu8(b01, zero));
        s10 = _mm256_add_epi64(s10, _mm256_sad_epu8(b10, zero));
        s11 = _mm256_add_epi64(s11, _mm256_sad_epu8(b11, zero));
        s20 = _mm256_add_epi64(s20, _mm256_sad_epu8(b20, zero));
        s21 = _mm256_add_epi64(s21, _mm256_sad_epu8(b21, zero));
        s30 = _mm256_add_epi64(s30, _mm256_sad_epu8(b30, zero));
        s31 = _mm256_add_epi64(s31, _mm256_sad_epu8(b31, zero));
    }
    int64_t t[4][OB];
    _mm256_storeu_si256((__m256i *)t[0], s00);
    _mm256_storeu_si256((__m256i *)(t[0] + 4), s01);
    _mm256_storeu_si256((__m256i *)t[1], s10);
    _mm256_storeu_si256((__m256i *)(t[1] + 4), s11);
    _mm256_storeu_si256((__m256i *)t[2], s20);
    _mm256_storeu_si256((__m256i *)(t[2] + 4), s21);
    _mm256_storeu_si256((__m256i *)t[3], s30);
    _mm256_storeu_si256((__m256i *)(t[3] + 4), s31);
    for (int j = 0; j < OB; ++j)
        for (int i = 0; i < 4; ++i) P[j * ldp + i] = (int32_t)t[i][j];
    P[0 * ldp + 4] = (int32_t)c0; P[1 * ldp + 4] = (int32_t)c1; P[2 * ldp + 4] = (int32_t)c2;
    P[3 * ldp + 4] = (int32_t)c3; P[4 * ldp + 4] = (int32_t)c4; P[5 * ldp + 4] = (int32_t)c5;
    P[6 * ldp + 4] = (int32_t)c6; P[7 * ldp + 4] = (int32_t)c7;
}

/* AVX2 for convolutions whose im2col row is a single word (LW == 1: 1x1 convs of <= 64 channels):
 * vectorised over pixels instead of output channels, 8 pixels x 8 outputs per pass and no
 * per-call set-up, which costs more than the counting itself at one word.  Fills P[j][i] for
 * j < OB and i < np. */
__attribute__((target("avx2,popcnt"))) static void mk_avx2_word(const u64 *A, int64_t lda, int np,
                                                                 const u64 *Wb, int32_t *P, int64_t ldp) {
    BZ_LUT_CONSTANTS;
    const __m256i zero = _mm256_setzero_si256();
    const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    int i = 0;
    for (; i + 8 <= np; i += 8) {
        __m256i a0, a1;
        if (lda == 1) {
            a0 = _mm256_loadu_si256((const __m256i *)(A + i));
            a1 = _mm256_loadu_si256((const __m256i *)(A + i + 4));
        } else {
            const u64 *r = A + i * lda;
            a0 = _mm256_setr_epi64x((long long)r[0], (long long)r[lda], (long long)r[2 * lda], (long long)r[3 * lda]);
            r += 4 * lda;
            a1 = _mm256_setr_epi64x((long long)r[0], (long long)r[lda], (long long)r[2 * lda], (long long)r[3 * lda]);
        }
        for (int j = 0; j < OB; ++j) {
            const __m256i w = _mm256_set1_epi64x((long long)Wb[j]);
            const __m256i x0 = _mm256_xor_si256(a0, w), x1 = _mm256_xor_si256(a1, w);
            const __m256i c0 = _mm256_sad_epu8(BZ_BYTE_COUNTS(x0), zero); /* pixels 0..3, a count per lane */
            const __m256i c1 = _mm256_sad_epu8(BZ_BYTE_COUNTS(x1), zero); /* pixels 4..7 */
            const __m256i both = _mm256_or_si256(c0, _mm256_slli_epi64(c1, 32));
            _mm256_storeu_si256((__m256i *)(P + j * ldp + i), _mm256_permutevar8x32_epi32(both, order));
        }
    }
    for (; i < np; ++i)
        for (int j = 0; j < OB; ++j) P[j * ldp + i] = (int32_t)__builtin_popcountll(A[i * lda] ^ Wb[j]);
}

#undef BZ_CNT
#undef BZ_BYTE_COUNTS
#undef BZ_LUT_CONSTANTS

/* AVX-512 VPOPCNTDQ: one vector = one word of all 8 output channels */
__attribute__((target("avx512f,avx512vpopcntdq,popcnt"))) static void mk_avx512(
    const u64 *A, int64_t lda, int npix, const u64 *Wb, int64_t LW, int32_t *P, int64_t ldp) {
    __m512i s[PB];
    for (int i = 0; i < PB; ++i) s[i] = _mm512_setzero_si512();
    for (int64_t k = 0; k < LW; ++k) {
        const __m512i w = _mm512_loadu_si512((const void *)(Wb + k * OB));
        for (int i = 0; i < npix; ++i) {
            const __m512i av = _mm512_set1_epi64((long long)A[i * lda + k]);
            s[i] = _mm512_add_epi64(s[i], _mm512_popcnt_epi64(_mm512_xor_si512(av, w)));
        }
    }
    for (int i = 0; i < npix; ++i) {
        int64_t t[OB];
        _mm512_storeu_si512((void *)t, s[i]);
        for (int j = 0; j < OB; ++j) P[j * ldp + i] = (int32_t)t[j];
    }
}
#endif

microkernel_fn select_microkernel(int kernel) {
#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
    switch (kernel) {
    case BZ_KERNEL_AVX512: return mk_avx512;
    case BZ_KERNEL_AVX2: return mk_avx2;
    case BZ_KERNEL_AVX2_HYBRID: return mk_avx2_hybrid;
    case BZ_KERNEL_POPCNT: return mk_popcnt;
    default: return mk_generic;
    }
#else
    (void)kernel;
    return mk_generic;
#endif
}

word_kernel_fn select_word_kernel(int kernel, int64_t LW) {
#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
    if (LW == 1 && (kernel == BZ_KERNEL_AVX2 || kernel == BZ_KERNEL_AVX2_HYBRID)) return mk_avx2_word;
#else
    (void)kernel;
    (void)LW;
#endif
    return NULL;
}
