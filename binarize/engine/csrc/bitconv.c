/*
 * binarize packed engine: bit packing and XNOR-popcount convolution on raw buffers.
 *
 * Layouts (all little-endian 64-bit words, bit i of word j = channel 64*j + i):
 *   packed activations  [N][H*W][G][NWG]         one run of NWG words per pixel and group
 *   packed weights      [G][OGP/OB][LW][OB]      OB = 8 output channels interleaved per word,
 *                                                LW = ceil(KH*KW*CG / 64) words holding the
 *                                                taps' channel bits back to back (tap-major)
 * A set bit means +1 and a clear bit -1, so for a valid tap
 *     sum_c a_c * w_c = CG - 2 * popcount(a XOR w)
 * and the whole dot product is NVALID*CG - 2*(popcount over the concatenated bits - CORR),
 * where padded taps are written as zero bits and CORR adds back popcount(w) of those taps
 * (exact zero padding, as in the float model).  Tail bits past CG are zero in both operands.
 *
 * Kernels: a portable C loop (builtin popcount), the same loop compiled for POPCNT, an AVX2
 * version (nibble-LUT popcount, Mula et al., "Faster population counts using AVX2
 * instructions", 2016) and an AVX-512 VPOPCNTDQ version, chosen at run time from the CPU's
 * features.  OpenMP splits the pixel tiles over threads.
 *
 * The library is loaded with ctypes; the functions below are its whole interface.
 */
#ifdef BZ_PYTHON_MODULE
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first, as Python requires */
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define BZ_X86 1
#include <immintrin.h>
#endif

#if defined(_MSC_VER)
#define BZ_EXPORT __declspec(dllexport)
#define BZ_INLINE static __forceinline
#else
#define BZ_EXPORT __attribute__((visibility("default")))
#define BZ_INLINE static inline __attribute__((always_inline))
#endif

typedef uint64_t u64;

#define OB 8   /* output channels interleaved in the packed weights */
#define PB 4   /* pixels per micro-kernel call (5 for the hybrid AVX2 + POPCNT kernel) */
#define PB_MAX 5
#define PACK_PIXELS 64 /* pixels per pack_rows call (its per-pixel buffers) */
#define TP 128 /* most pixels per tile (one im2col buffer); wide maps use all, others half */

/* epilogue ops applied after y = dot * scale[o] + shift[o] */
/* BZ_OP_RESIDUAL adds a float map (the conv's residual operand) element by element */
enum { BZ_OP_ADD = 1, BZ_OP_MUL = 2, BZ_OP_PRELU = 3, BZ_OP_RELU = 4, BZ_OP_RESIDUAL = 5, BZ_OP_SIGMOID = 6,
       BZ_OP_TANH = 7 };
#define BZ_MAX_OPS 8

/* smallest jobs worth a parallel region: floats packed, (pixel x output x word) popcounts */
#define BZ_PACK_PARALLEL_MIN 32768
#define BZ_CONV_PARALLEL_MIN 100000.0

enum { BZ_KERNEL_AUTO = 0, BZ_KERNEL_GENERIC = 1, BZ_KERNEL_POPCNT = 2, BZ_KERNEL_AVX2 = 3,
       BZ_KERNEL_AVX512 = 4, BZ_KERNEL_AVX2_HYBRID = 5, BZ_KERNEL_AVX2_NIBBLE = 6 };

static int g_forced_kernel = BZ_KERNEL_AUTO;

/* ------------------------------------------------------------------------------------------ */
/* CPU features                                                                               */
/* ------------------------------------------------------------------------------------------ */

static int cpu_has(int kernel) {
#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    switch (kernel) {
    case BZ_KERNEL_GENERIC: return 1;
    case BZ_KERNEL_POPCNT: return __builtin_cpu_supports("popcnt");
    case BZ_KERNEL_AVX2:
    case BZ_KERNEL_AVX2_HYBRID:
    case BZ_KERNEL_AVX2_NIBBLE:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case BZ_KERNEL_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
    default: return 0;
    }
#else
    return kernel == BZ_KERNEL_GENERIC;
#endif
}

static int best_kernel(void) {
    if (g_forced_kernel != BZ_KERNEL_AUTO && cpu_has(g_forced_kernel)) return g_forced_kernel;
    if (cpu_has(BZ_KERNEL_AVX512)) return BZ_KERNEL_AVX512;
    if (cpu_has(BZ_KERNEL_AVX2)) return BZ_KERNEL_AVX2_NIBBLE;
    if (cpu_has(BZ_KERNEL_POPCNT)) return BZ_KERNEL_POPCNT;
    return BZ_KERNEL_GENERIC;
}

/* 1 if the kernel can run on this CPU */
BZ_EXPORT int bz_kernel_available(int kernel) { return cpu_has(kernel); }

/* force a kernel (0 = automatic); returns the kernel that will run */
BZ_EXPORT int bz_set_kernel(int kernel) {
    g_forced_kernel = kernel;
    return best_kernel();
}

BZ_EXPORT int bz_active_kernel(void) { return best_kernel(); }

BZ_EXPORT int bz_openmp_enabled(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

BZ_EXPORT int bz_abi_version(void) { return 19; }

static inline int clamp_threads(int n) { return n < 1 ? 1 : n; }

/* ------------------------------------------------------------------------------------------ */
/* Packing: fused  bias-add + sign + pack                                                     */
/* ------------------------------------------------------------------------------------------ */

/* GCC/clang on x86 Linux: compile hot loops twice (AVX2 and baseline) and pick at load time */
#if defined(BZ_X86) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(BZ_NO_CLONES)
#define BZ_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define BZ_CLONES
#endif

/* one 64-channel word for np <= PACK_PIXELS pixels, channel c read from rows[c][i * sp]: 32-bit
 * halves so the compare vectorises per lane */
BZ_CLONES static void pack_rows(const float *const *rows, int64_t sp, int64_t nc, int64_t np, const float *bias,
                                u64 *dst, int64_t dst_stride) {
    uint32_t lo[PACK_PIXELS], hi[PACK_PIXELS];
    for (int64_t i = 0; i < np; ++i) lo[i] = hi[i] = 0;
    for (int64_t c = 0; c < nc; ++c) {
        const float *row = rows[c];
        const float b = bias ? bias[c] : 0.0f;
        const uint32_t bit = (uint32_t)1 << (c & 31);
        uint32_t *acc = c < 32 ? lo : hi;
        if (sp == 1) {
            for (int64_t i = 0; i < np; ++i) acc[i] |= (row[i] + b >= 0.0f) ? bit : 0u;
        } else {
            for (int64_t i = 0; i < np; ++i) acc[i] |= (row[i * sp] + b >= 0.0f) ? bit : 0u;
        }
    }
    for (int64_t i = 0; i < np; ++i) dst[i * dst_stride] = (u64)lo[i] | ((u64)hi[i] << 32);
}

/* the same for channels at a fixed stride: channel c's row starts at x + c * sc */
static void pack_block(const float *x, int64_t sc, int64_t sp, int64_t nc, int64_t np, const float *bias, u64 *dst,
                       int64_t dst_stride) {
    const float *rows[64];
    for (int64_t c = 0; c < nc; ++c) rows[c] = x + c * sc;
    pack_rows(rows, sp, nc, np, bias, dst, dst_stride);
}

/*
 * x: float tensor addressed as x[n*sn + c*sc + p*sp] (p = flattened pixel), C channels split in
 * G groups of CG; bias (nullable) per channel.  bit = (x + bias >= 0).  out: [N][P][G][NWG].
 */
BZ_EXPORT void bz_pack(const float *x, int64_t N, int64_t C, int64_t P, int64_t sn, int64_t sc,
                       int64_t sp, const float *bias, int64_t G, u64 *out, int nthreads) {
    const int64_t CG = C / G;
    const int64_t NWG = (CG + 63) / 64;
    const int64_t row_words = G * NWG;
    const int64_t PBLK = PACK_PIXELS;
    const int64_t nblk = (P + PBLK - 1) / PBLK;
    int64_t job;
    /* threads only pay off above ~100 us of work: waking a pool costs more on a busy machine */
    const int parallel = nthreads > 1 && N * P * C >= BZ_PACK_PARALLEL_MIN;
    (void)parallel; /* unused without OpenMP */
#pragma omp parallel for schedule(static) num_threads(clamp_threads(nthreads)) if (parallel)
    for (job = 0; job < N * nblk; ++job) {
        const int64_t n = job / nblk;
        const int64_t p0 = (job % nblk) * PBLK;
        const int64_t np = (P - p0) < PBLK ? (P - p0) : PBLK;
        for (int64_t g = 0; g < G; ++g) {
            for (int64_t j = 0; j < NWG; ++j) {
                const int64_t c0 = g * CG + j * 64;
                const int64_t nc = (CG - j * 64) < 64 ? (CG - j * 64) : 64;
                pack_block(x + n * sn + c0 * sc + p0 * sp, sc, sp, nc, np, bias ? bias + c0 : NULL,
                           out + (n * P + p0) * row_words + g * NWG + j, row_words);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Convolution                                                                                */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    /* input: packed words, or (in == NULL) floats x[n*xs_n + c*xs_c + pixel*xs_p], bit = x + bias >= 0 */
    const u64 *in;
    const float *x, *x_bias;
    int64_t xs_n, xs_c, xs_p;
    int64_t N, H, W, G, CG, NWG;
    /* weights */
    const u64 *w;
    const int32_t *wpc; /* [G*OGP][KH*KW] popcount of each tap's weight bits (zero padding) */
    int64_t O, OG, OGP, LW;
    int64_t KH, KW, SH, SW, PH, PW, DH, DW;
    int pad_mode; /* 0: zeros (exact), 1: +1, -1: -1 */
    int64_t OH, OW;
    /* epilogue */
    const float *scale, *shift;
    int nops;
    int ops[BZ_MAX_OPS];
    const float *op_args[BZ_MAX_OPS];
    /* residual operand of BZ_OP_RESIDUAL: [N][RC][OH*OW], output channel o reads channel o % RC */
    const float *residual;
    int64_t res_channels;
    /* 0, or 1: the residual has 2 * res_channels channels and the operand is the mean of its two
     * halves, (r[c] + r[c + res_channels]) * 0.5 (a shrinking block's shortcut) */
    int res_halves;
    /* output */
    float *out;
    const int64_t *positions; /* nullable: flattened n*OH*OW + pixel indices to compute */
    int64_t npos;
    /* nullable (listed positions only): accumulate instead of store, out = y * acc_weight[pos] + out
     * (a sparse-assisted pair's masked sum, with the mask [N][OH*OW] as the weight) */
    const float *acc_weight;
    /* nullable: also pack the output (bit = y + out_bias >= 0) into [N][OH*OW][ceil(O/64)] words
     * for the next binary layer, while the tile is still in cache (dense, G == 1 only) */
    u64 *out_bits;
    const float *out_bias;
    /* nullable: a full-precision 1x1 conv after the epilogue (dense, G == 1 only): the output has
     * mix_out channels, out = [relu](mix_w [mix_out][O] @ y + mix_b), y never leaves the tile */
    const float *mix_w, *mix_b;
    int64_t mix_out;
    int mix_relu;
    int mix_fma; /* the CPU has AVX2 + FMA */
    int chain;   /* BZ_CHAIN_*: the op chain's one-pass loop (BZ_CHAIN_NONE: op passes) */
    /* nullable: nibble tables [OGP/4][KH*KW][NK][4][16] bytes (NK = ceil(CG/4)): entry i of output o,
     * tap t, nibble k is popcount(i XOR the 4 weight bits w there); or (shared_tables) their selectors
     * [OGP/4][KH*KW][NK][4], the byte 16 * w, the offset of the same 16 bytes in bz_xor_popcount.
     * With them a dense ungrouped call on AVX2 counts by table look-ups over the planes below instead
     * of im2col + XOR + popcount. */
    const uint8_t *tables;
    int shared_tables;
    int64_t NK;
    /* the input regrouped for the tables (built by conv_run): byte = the 4 channel bits of nibble k of
     * one pixel, [N][Hp][NK][SW][Wq] with the padding included (Hp = H + 2 PH rows, Wq columns per
     * column phase mod SW, so every tap of 32 neighbouring outputs is 32 contiguous bytes) */
    uint8_t *planes;
    int64_t plane_cols, plane_k, plane_row, plane_image; /* strides: phase, nibble, row, image */
    int64_t *tap_offsets;                                  /* [KH*KW] byte offset of each tap */
    int32_t *valid_rows, *valid_cols; /* [OH], [OW]: taps inside the input (all of them unless zero padding) */
} conv_args;

/* builds a bit string word by word in a register (no read-modify-write of memory) */
typedef struct {
    u64 *dst;
    u64 cur;
    int fill;
} bit_writer;

/* append the low nb (1..64) bits of v; the bits of v above nb must be zero */
BZ_INLINE void put_bits(bit_writer *bw, u64 v, int nb) {
    bw->cur |= v << bw->fill;
    bw->fill += nb;
    if (bw->fill >= 64) {
        *bw->dst++ = bw->cur;
        bw->fill -= 64;
        bw->cur = bw->fill ? v >> (nb - bw->fill) : 0;
    }
}

BZ_INLINE void flush_bits(bit_writer *bw) {
    if (bw->fill) *bw->dst++ = bw->cur;
}

/* append one tap: NWG words of which the last holds `tail` bits */
BZ_INLINE void put_tap(bit_writer *bw, const u64 *src, int64_t NWG, int tail) {
    for (int64_t j = 0; j + 1 < NWG; ++j) put_bits(bw, src[j], 64);
    put_bits(bw, src[NWG - 1], tail);
}

/* packed im2col of one pixel: returns the number of valid taps (all taps unless zero padding) */
BZ_INLINE int64_t im2col_pixel(const conv_args *a, int64_t n, int64_t g, int64_t oh, int64_t ow,
                               u64 *dst, int32_t *invalid_taps) {
    const int64_t row_words = a->G * a->NWG;
    const int64_t CG = a->CG, NWG = a->NWG;
    const int64_t ih0 = oh * a->SH - a->PH, iw0 = ow * a->SW - a->PW;
    const int tail = (int)(CG - 64 * (NWG - 1));
    const int interior = ih0 >= 0 && ih0 + (a->KH - 1) * a->DH < a->H && iw0 >= 0 &&
                         iw0 + (a->KW - 1) * a->DW < a->W;
    bit_writer bw = {dst, 0, 0};
    if (interior) {
        const u64 *base = a->in + ((n * a->H + ih0) * a->W + iw0) * row_words + g * NWG;
        const int64_t step_h = a->DH * a->W * row_words, step_w = a->DW * row_words;
        if ((CG & 63) == 0) { /* whole words: plain copies */
            u64 *d = dst;
            for (int64_t kh = 0; kh < a->KH; ++kh)
                for (int64_t kw = 0; kw < a->KW; ++kw, d += NWG) {
                    const u64 *src = base + kh * step_h + kw * step_w;
                    for (int64_t j = 0; j < NWG; ++j) d[j] = src[j];
                }
            return a->KH * a->KW;
        }
        if (NWG == 1 && a->KW * CG <= 64) { /* a kernel row's taps fit one word: one append per row */
            for (int64_t kh = 0; kh < a->KH; ++kh) {
                const u64 *src = base + kh * step_h;
                u64 row = 0;
                for (int64_t kw = 0; kw < a->KW; ++kw) row |= src[kw * step_w] << (kw * CG);
                put_bits(&bw, row, (int)(a->KW * CG));
            }
            flush_bits(&bw);
            return a->KH * a->KW;
        }
        for (int64_t kh = 0; kh < a->KH; ++kh)
            for (int64_t kw = 0; kw < a->KW; ++kw) put_tap(&bw, base + kh * step_h + kw * step_w, NWG, tail);
        flush_bits(&bw);
        return a->KH * a->KW;
    }
    /* border pixel: padded taps are zero bits (exact zero padding, corrected later) or +-1 */
    const u64 tail_mask = tail == 64 ? ~(u64)0 : (((u64)1 << tail) - 1);
    int64_t nvalid = 0;
    for (int64_t kh = 0; kh < a->KH; ++kh) {
        const int64_t ih = ih0 + kh * a->DH;
        for (int64_t kw = 0; kw < a->KW; ++kw) {
            const int64_t iw = iw0 + kw * a->DW;
            if (ih < 0 || ih >= a->H || iw < 0 || iw >= a->W) {
                invalid_taps[kh * a->KW + kw - nvalid] = (int32_t)(kh * a->KW + kw);
                const u64 fill = a->pad_mode == 1 ? ~(u64)0 : 0;
                for (int64_t j = 0; j + 1 < NWG; ++j) put_bits(&bw, fill, 64);
                put_bits(&bw, fill & tail_mask, tail);
                continue;
            }
            ++nvalid;
            put_tap(&bw, a->in + ((n * a->H + ih) * a->W + iw) * row_words + g * NWG, NWG, tail);
        }
    }
    flush_bits(&bw);
    return a->pad_mode == 0 ? nvalid : a->KH * a->KW;
}

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

/* Counting by table look-up (the nibble tables of conv_args): a plane byte holds 4 input bits of
 * one pixel, and VPSHUFB maps 32 such bytes through the 16-entry table of one (output, tap, nibble)
 * to popcount(bits XOR weight bits) at once: 32 pixels x 4 channels per instruction, with no XOR,
 * no shifts and no im2col.  The padding byte 0x80 reads as 0 (VPSHUFB zeroes bytes whose index has
 * bit 7 set), which is exact zero padding for free.  Byte sums hold 63 look-ups (63 x 4 < 256) and
 * are then widened to 16 bits.  Counts of 4 outputs at two vectors of up to 32 neighbouring
 * outputs (v0, v1) go to P[o * ldp + i0 + lane] for lane < n0 (i1, n1 for v1; n1 = 0: none). */
#define BZ_WIDEN(acc, o, v)                                                                          \
    do {                                                                                           \
        wide[o][v][0] = _mm256_add_epi16(wide[o][v][0], _mm256_unpacklo_epi8(acc, zero));          \
        wide[o][v][1] = _mm256_add_epi16(wide[o][v][1], _mm256_unpackhi_epi8(acc, zero));          \
        acc = zero;                                                                                \
    } while (0)
#define BZ_WIDEN_ALL()                                                                             \
    do {                                                                                           \
        BZ_WIDEN(a00, 0, 0); BZ_WIDEN(a01, 0, 1); BZ_WIDEN(a10, 1, 0); BZ_WIDEN(a11, 1, 1);         \
        BZ_WIDEN(a20, 2, 0); BZ_WIDEN(a21, 2, 1); BZ_WIDEN(a30, 3, 0); BZ_WIDEN(a31, 3, 1);         \
    } while (0)
#define BZ_LOOKUP(acc, table, index) acc = _mm256_add_epi8(acc, _mm256_shuffle_epi8(table, index))

/* the 16 tables every look-up uses: row w holds popcount(i XOR w) for i = 0..15.  A layer keeps one
 * byte per (output, tap, nibble), the offset 16 * w of its row (the selectors of conv_args), so its
 * weights take 1 byte per 4 bits and stay in the L2 cache even for 256 x 256 x 3 x 3 */
static const uint8_t bz_xor_popcount[256] __attribute__((aligned(64))) = {
#define BZ_POP4(i) ((uint8_t)(((i) & 1) + (((i) >> 1) & 1) + (((i) >> 2) & 1) + (((i) >> 3) & 1)))
#define BZ_ROW(w) BZ_POP4(0 ^ (w)), BZ_POP4(1 ^ (w)), BZ_POP4(2 ^ (w)), BZ_POP4(3 ^ (w)), BZ_POP4(4 ^ (w)),  \
    BZ_POP4(5 ^ (w)), BZ_POP4(6 ^ (w)), BZ_POP4(7 ^ (w)), BZ_POP4(8 ^ (w)), BZ_POP4(9 ^ (w)),                \
    BZ_POP4(10 ^ (w)), BZ_POP4(11 ^ (w)), BZ_POP4(12 ^ (w)), BZ_POP4(13 ^ (w)), BZ_POP4(14 ^ (w)),           \
    BZ_POP4(15 ^ (w))
    BZ_ROW(0), BZ_ROW(1), BZ_ROW(2), BZ_ROW(3), BZ_ROW(4), BZ_ROW(5), BZ_ROW(6), BZ_ROW(7),
    BZ_ROW(8), BZ_ROW(9), BZ_ROW(10), BZ_ROW(11), BZ_ROW(12), BZ_ROW(13), BZ_ROW(14), BZ_ROW(15),
#undef BZ_ROW
#undef BZ_POP4
};
#define BZ_TABLE(sel) _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(bz_xor_popcount + (sel))))
/* table j of the current entry: its selector (shared) or its own 16 bytes, and the step to the next entry */
#define BZ_FETCH(L, j) \
    (shared ? BZ_TABLE((L)[j]) : _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)((L) + 16 * (j)))))
#define BZ_STEP (shared ? 4 : 64)

/* the first count (<= 32) pixels of one vector's 16-bit sums (lanes: pixels 0-7,16-23 | 8-15,24-31)
 * as int32 in pixel order */
__attribute__((target("avx2"))) static void nibble_store(const __m256i wide[2], int32_t *dst, int count) {
    int32_t tmp[32];
    int32_t *out = count == 32 ? dst : tmp;
    _mm256_storeu_si256((__m256i *)out, _mm256_cvtepu16_epi32(_mm256_castsi256_si128(wide[0])));
    _mm256_storeu_si256((__m256i *)(out + 8), _mm256_cvtepu16_epi32(_mm256_castsi256_si128(wide[1])));
    _mm256_storeu_si256((__m256i *)(out + 16), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(wide[0], 1)));
    _mm256_storeu_si256((__m256i *)(out + 24), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(wide[1], 1)));
    if (out == tmp) memcpy(dst, tmp, sizeof(int32_t) * (size_t)count);
}

__attribute__((target("avx2"), always_inline)) static inline void
nibble_counts_impl(const uint8_t *v0, const uint8_t *v1, const int64_t *tap_off, int64_t taps, int64_t NK,
                   int64_t k_stride, const uint8_t *L, int32_t *P, int64_t ldp, int i0, int n0, int i1, int n1,
                   const int shared) {
    const __m256i zero = _mm256_setzero_si256();
    __m256i wide[4][2][2]; /* 16-bit sums [output][vector][pixels 0-7,16-23 | 8-15,24-31] */
    for (int o = 0; o < 4; ++o)
        for (int v = 0; v < 2; ++v) wide[o][v][0] = wide[o][v][1] = zero;
    __m256i a00 = zero, a01 = zero, a10 = zero, a11 = zero, a20 = zero, a21 = zero, a30 = zero, a31 = zero;
    int pending = 0;
    for (int64_t t = 0; t < taps; ++t) {
        const uint8_t *p0 = v0 + tap_off[t], *p1 = v1 + tap_off[t];
        for (int64_t k = 0; k < NK; ++k, p0 += k_stride, p1 += k_stride, L += BZ_STEP) {
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)p0);
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)p1);
            const __m256i t0 = BZ_FETCH(L, 0);
            BZ_LOOKUP(a00, t0, x0); BZ_LOOKUP(a01, t0, x1);
            const __m256i t1 = BZ_FETCH(L, 1);
            BZ_LOOKUP(a10, t1, x0); BZ_LOOKUP(a11, t1, x1);
            const __m256i t2 = BZ_FETCH(L, 2);
            BZ_LOOKUP(a20, t2, x0); BZ_LOOKUP(a21, t2, x1);
            const __m256i t3 = BZ_FETCH(L, 3);
            BZ_LOOKUP(a30, t3, x0); BZ_LOOKUP(a31, t3, x1);
            if (++pending == 63) {
                pending = 0;
                BZ_WIDEN_ALL();
            }
        }
    }
    BZ_WIDEN_ALL();
    for (int o = 0; o < 4; ++o) {
        nibble_store(wide[o][0], P + o * ldp + i0, n0);
        if (n1 > 0) nibble_store(wide[o][1], P + o * ldp + i1, n1);
    }
}

/* the same for one vector and 8 outputs (tables of outputs 0-3 at t03, of 4-7 at t47): a tile whose
 * vectors do not pair up, without counting a second vector for nothing */
__attribute__((target("avx2"), always_inline)) static inline void
nibble_counts8_impl(const uint8_t *v0, const int64_t *tap_off, int64_t taps, int64_t NK, int64_t k_stride,
                    const uint8_t *L, const uint8_t *M, int32_t *P, int64_t ldp, int i0, int n0, const int shared) {
    const __m256i zero = _mm256_setzero_si256();
    __m256i wide[8][1][2];
    for (int o = 0; o < 8; ++o) wide[o][0][0] = wide[o][0][1] = zero;
    __m256i a00 = zero, a10 = zero, a20 = zero, a30 = zero, a40 = zero, a50 = zero, a60 = zero, a70 = zero;
    int pending = 0;
    for (int64_t t = 0; t < taps; ++t) {
        const uint8_t *p0 = v0 + tap_off[t];
        for (int64_t k = 0; k < NK; ++k, p0 += k_stride, L += BZ_STEP, M += BZ_STEP) {
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)p0);
            BZ_LOOKUP(a00, BZ_FETCH(L, 0), x0);
            BZ_LOOKUP(a10, BZ_FETCH(L, 1), x0);
            BZ_LOOKUP(a20, BZ_FETCH(L, 2), x0);
            BZ_LOOKUP(a30, BZ_FETCH(L, 3), x0);
            BZ_LOOKUP(a40, BZ_FETCH(M, 0), x0);
            BZ_LOOKUP(a50, BZ_FETCH(M, 1), x0);
            BZ_LOOKUP(a60, BZ_FETCH(M, 2), x0);
            BZ_LOOKUP(a70, BZ_FETCH(M, 3), x0);
            if (++pending == 63) {
                pending = 0;
                BZ_WIDEN(a00, 0, 0); BZ_WIDEN(a10, 1, 0); BZ_WIDEN(a20, 2, 0); BZ_WIDEN(a30, 3, 0);
                BZ_WIDEN(a40, 4, 0); BZ_WIDEN(a50, 5, 0); BZ_WIDEN(a60, 6, 0); BZ_WIDEN(a70, 7, 0);
            }
        }
    }
    BZ_WIDEN(a00, 0, 0); BZ_WIDEN(a10, 1, 0); BZ_WIDEN(a20, 2, 0); BZ_WIDEN(a30, 3, 0);
    BZ_WIDEN(a40, 4, 0); BZ_WIDEN(a50, 5, 0); BZ_WIDEN(a60, 6, 0); BZ_WIDEN(a70, 7, 0);
    for (int o = 0; o < 8; ++o) nibble_store(wide[o][0], P + o * ldp + i0, n0);
}

/* the two table forms (tables: 16 bytes per entry; shared: a 1-byte selector of bz_xor_popcount) */
#define BZ_COUNTS_ARGS const uint8_t *v0, const uint8_t *v1, const int64_t *tap_off, int64_t taps, int64_t NK, \
    int64_t k_stride, const uint8_t *L, int32_t *P, int64_t ldp, int i0, int n0, int i1, int n1
#define BZ_COUNTS8_ARGS const uint8_t *v0, const int64_t *tap_off, int64_t taps, int64_t NK, int64_t k_stride, \
    const uint8_t *L, const uint8_t *M, int32_t *P, int64_t ldp, int i0, int n0
__attribute__((target("avx2"))) static void nibble_counts_tables(BZ_COUNTS_ARGS) {
    nibble_counts_impl(v0, v1, tap_off, taps, NK, k_stride, L, P, ldp, i0, n0, i1, n1, 0);
}
__attribute__((target("avx2"))) static void nibble_counts_shared(BZ_COUNTS_ARGS) {
    nibble_counts_impl(v0, v1, tap_off, taps, NK, k_stride, L, P, ldp, i0, n0, i1, n1, 1);
}
__attribute__((target("avx2"))) static void nibble_counts8_tables(BZ_COUNTS8_ARGS) {
    nibble_counts8_impl(v0, tap_off, taps, NK, k_stride, L, M, P, ldp, i0, n0, 0);
}
__attribute__((target("avx2"))) static void nibble_counts8_shared(BZ_COUNTS8_ARGS) {
    nibble_counts8_impl(v0, tap_off, taps, NK, k_stride, L, M, P, ldp, i0, n0, 1);
}
#undef BZ_COUNTS_ARGS
#undef BZ_COUNTS8_ARGS
#undef BZ_LOOKUP
#undef BZ_TABLE
#undef BZ_FETCH
#undef BZ_STEP
#undef BZ_WIDEN_ALL
#undef BZ_WIDEN
#endif

typedef void (*microkernel_fn)(const u64 *, int64_t, int, const u64 *, int64_t, int32_t *, int64_t);

static microkernel_fn select_microkernel(int kernel) {
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

/* all np pixels of a tile at once, for LW == 1 (NULL: use the micro-kernel) */
typedef void (*word_kernel_fn)(const u64 *, int64_t, int, const u64 *, int32_t *, int64_t);

static word_kernel_fn select_word_kernel(int kernel, int64_t LW) {
#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
    if (LW == 1 && (kernel == BZ_KERNEL_AVX2 || kernel == BZ_KERNEL_AVX2_HYBRID)) return mk_avx2_word;
#else
    (void)kernel;
    (void)LW;
#endif
    return NULL;
}

/* 8-lane float / int vectors (GCC / clang vector extensions) for the epilogue's loops */
#if defined(__GNUC__)
typedef float bz_v8f __attribute__((vector_size(32), aligned(4)));
typedef int32_t bz_v8i __attribute__((vector_size(32), aligned(4)));
#endif
/* exp, sigmoid and tanh for the gate epilogues, vectorised (8 lanes) with a scalar twin that does
 * the same operations.  exp: Cody-Waite reduction x = n ln2 + r and the degree-6 polynomial of
 * Cephes' expf (S. L. Moshier, Cephes Mathematical Library); tanh: Cephes' tanhf (odd polynomial
 * below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above).  Within ~2 ulp of libm / PyTorch. */
#define BZ_EXP_POLY(r, z) \
    (((((((1.9875691500e-4f * (r) + 1.3981999507e-3f) * (r) + 8.3334519073e-3f) * (r) + 4.1665795894e-2f) * \
         (r) + 1.6666665459e-1f) * (r) + 5.0000001201e-1f) * (z) + (r)) + 1.0f)
#define BZ_TANH_POLY(z) \
    ((((-5.70498872745e-3f * (z) + 2.06390887954e-2f) * (z) - 5.37397155531e-2f) * (z) + 1.33314422036e-1f) * \
         (z) - 3.33332819422e-1f)

static inline float bz_expf(float x) {
    x = x > 88.3762626647949f ? 88.3762626647949f : (x < -87.3365447504f ? -87.3365447504f : x);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const float z = r * r;
    const float y = BZ_EXP_POLY(r, z);
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

static inline float bz_sigmoidf(float x) { return 1.0f / (1.0f + bz_expf(-x)); }

static inline float bz_tanhf(float x) {
    const float ax = fabsf(x);
    if (ax < 0.625f) {
        const float z = x * x;
        return BZ_TANH_POLY(z) * z * x + x;
    }
    const float t = 1.0f - 2.0f / (bz_expf(2.0f * ax) + 1.0f);
    return x < 0.0f ? -t : t;
}

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi" /* the 8-lane helpers are always inlined */
BZ_INLINE bz_v8f bz_v8_select(bz_v8i keep, bz_v8f a, bz_v8f b) {
    return (bz_v8f)(((bz_v8i)a & keep) | ((bz_v8i)b & ~keep));
}

BZ_INLINE bz_v8f bz_v8_exp(bz_v8f x) {
    const bz_v8f hi = x * 0.0f + 88.3762626647949f, lo = x * 0.0f - 87.3365447504f;
    x = bz_v8_select(x > hi, hi, x);
    x = bz_v8_select(x < lo, lo, x);
    bz_v8f t = x * 1.44269504088896341f + 0.5f;
    /* floor of t: truncate, then step down where truncation went up (negative non-integers) */
    bz_v8f n = __builtin_convertvector(__builtin_convertvector(t, bz_v8i), bz_v8f);
    n = bz_v8_select(n > t, n - 1.0f, n);
    bz_v8f r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const bz_v8f z = r * r;
    const bz_v8f y = BZ_EXP_POLY(r, z);
    const bz_v8i bits = (__builtin_convertvector(n, bz_v8i) + 127) << 23;
    return y * (bz_v8f)bits;
}

BZ_INLINE bz_v8f bz_v8_sigmoid(bz_v8f x) { return 1.0f / (1.0f + bz_v8_exp(-x)); }

BZ_INLINE bz_v8f bz_v8_tanh(bz_v8f x) {
    const bz_v8i sign = (bz_v8i)x & (int32_t)0x80000000;
    const bz_v8f ax = (bz_v8f)((bz_v8i)x & (int32_t)0x7fffffff);
    const bz_v8f z = x * x;
    const bz_v8f small = BZ_TANH_POLY(z) * z * x + x;
    const bz_v8f t = 1.0f - 2.0f / (bz_v8_exp(2.0f * ax) + 1.0f);
    const bz_v8f large = (bz_v8f)((bz_v8i)t | sign);
    return bz_v8_select(ax < 0.625f, small, large);
}
#endif

/* y = y >= 0 ? y : y * slope, in place.  Written as a bitwise select of both results: compilers
 * leave the plain conditional as a (mispredicted) branch, which made PReLU 20x slower than an add. */
BZ_INLINE void prelu_run(float *y, int64_t np, float slope) {
    int64_t i = 0;
#if defined(__GNUC__)
    for (; i + 8 <= np; i += 8) {
        bz_v8f v, n;
        memcpy(&v, y + i, sizeof v);
        n = v * slope;
        const bz_v8i keep = v >= 0.0f;
        const bz_v8i r = ((bz_v8i)v & keep) | ((bz_v8i)n & ~keep);
        memcpy(y + i, &r, sizeof r);
    }
#endif
    for (; i < np; ++i) { const float n = y[i] * slope; y[i] = y[i] >= 0.0f ? y[i] : n; }
}

/* one op over a row of np floats, in place (vectorised; the scalar tail does the same
 * operations, so every element rounds the same way) */
BZ_INLINE void op_run(int op, float cv, float *y, int np, const float *res) {
    int i = 0;
#if defined(__GNUC__)
#define BZ_OP_LOOP(expr)                                  \
    for (; i + 8 <= np; i += 8) {                         \
        bz_v8f v;                                         \
        memcpy(&v, y + i, sizeof v);                      \
        v = (expr);                                       \
        memcpy(y + i, &v, sizeof v);                      \
    }
    switch (op) {
    case BZ_OP_ADD: BZ_OP_LOOP(v + cv) break;
    case BZ_OP_MUL: BZ_OP_LOOP(v * cv) break;
    case BZ_OP_PRELU: BZ_OP_LOOP(bz_v8_select(v >= 0.0f, v, v * cv)) break;
    case BZ_OP_RELU: BZ_OP_LOOP((bz_v8f)((bz_v8i)v & (v > 0.0f))) break;
    case BZ_OP_RESIDUAL:
        for (; i + 8 <= np; i += 8) {
            bz_v8f v, r;
            memcpy(&v, y + i, sizeof v);
            memcpy(&r, res + i, sizeof r);
            v = v + r;
            memcpy(y + i, &v, sizeof v);
        }
        break;
    case BZ_OP_SIGMOID: BZ_OP_LOOP(bz_v8_sigmoid(v)) break;
    case BZ_OP_TANH: BZ_OP_LOOP(bz_v8_tanh(v)) break;
    default: break;
    }
#undef BZ_OP_LOOP
#endif
    for (; i < np; ++i) {
        float v = y[i];
        switch (op) {
        case BZ_OP_ADD: v = v + cv; break;
        case BZ_OP_MUL: v = v * cv; break;
        case BZ_OP_PRELU: { const float n = v * cv; v = v >= 0.0f ? v : n; break; }
        case BZ_OP_RELU: v = v > 0.0f ? v : 0.0f; break;
        case BZ_OP_RESIDUAL: v = v + res[i]; break;
        case BZ_OP_SIGMOID: v = bz_sigmoidf(v); break;
        case BZ_OP_TANH: v = bz_tanhf(v); break;
        default: break;
        }
        y[i] = v;
    }
}

/* the op chains BiMatting's layers end with, run in one pass with the value in registers (the
 * same operations in the same order as the op passes, so the same roundings).  sigmoid / tanh
 * stay separate passes: inlined into the conversion loop they ran ~10% slower (register pressure). */
enum { BZ_CHAIN_NONE, BZ_CHAIN_PRELU, BZ_CHAIN_RELU, BZ_CHAIN_SHORTCUT };

static int chain_kind(const conv_args *a) {
    if (a->nops == 1) {
        switch (a->ops[0]) {
        case BZ_OP_PRELU: return BZ_CHAIN_PRELU;
        case BZ_OP_RELU: return BZ_CHAIN_RELU;
        default: return BZ_CHAIN_NONE;
        }
    }
    /* residual, shift, PReLU, shift: the end of every BiMobileNet block stage */
    if (a->nops == 4 && a->ops[0] == BZ_OP_RESIDUAL && a->ops[1] == BZ_OP_ADD && a->ops[2] == BZ_OP_PRELU &&
        a->ops[3] == BZ_OP_ADD)
        return BZ_CHAIN_SHORTCUT;
    return BZ_CHAIN_NONE;
}

/* epilogue of one output channel over np <= TP pixels: y = (base - 2*popc) * scale + shift, then
 * the ops one after another over the row, which stays in L1 (a loop over the ops inside the pixel
 * loop keeps the value on the stack: a store-to-load chain of several cycles per op and vector).
 * res: the residual operand's values at these pixels (BZ_OP_RESIDUAL). */
BZ_CLONES static void epilogue_row(const conv_args *a, int64_t oc, const int32_t *popc, const int32_t *base,
                                   int np, float *y, const float *res) {
    const float sc = a->scale ? a->scale[oc] : 1.0f;
    const float sh = a->shift ? a->shift[oc] : 0.0f;
    int i = 0;
#if defined(__GNUC__)
    float cv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int q = 0; q < a->nops && q < 4; ++q) cv[q] = a->op_args[q] ? a->op_args[q][oc] : 0.0f;
#define BZ_EPILOGUE_LOOP(CHAIN)                                                      \
    for (; i + 8 <= np; i += 8) {                                                    \
        bz_v8i b, p;                                                                 \
        memcpy(&b, base + i, sizeof b);                                              \
        memcpy(&p, popc + i, sizeof p);                                              \
        bz_v8f v = __builtin_convertvector(b - 2 * p, bz_v8f) * sc;                  \
        v = v + sh;                                                                  \
        CHAIN;                                                                       \
        memcpy(y + i, &v, sizeof v);                                                 \
    }
    switch (a->chain) {
    case BZ_CHAIN_PRELU: BZ_EPILOGUE_LOOP(v = bz_v8_select(v >= 0.0f, v, v * cv[0])) break;
    case BZ_CHAIN_RELU: BZ_EPILOGUE_LOOP(v = (bz_v8f)((bz_v8i)v & (v > 0.0f))) break;
    case BZ_CHAIN_SHORTCUT:
        BZ_EPILOGUE_LOOP({
            bz_v8f r;
            memcpy(&r, res + i, sizeof r);
            v = v + r;
            v = v + cv[1];
            v = bz_v8_select(v >= 0.0f, v, v * cv[2]);
            v = v + cv[3];
        })
        break;
    default: BZ_EPILOGUE_LOOP((void)0) break; /* the ops run as passes below */
    }
#undef BZ_EPILOGUE_LOOP
#endif
    /* the pixels past the last full vector (all of them without vector extensions) */
    const int done = a->chain == BZ_CHAIN_NONE ? 0 : i; /* pixels whose ops the one-pass loop ran */
    for (; i < np; ++i) {
        const float v = (float)(base[i] - 2 * popc[i]) * sc;
        y[i] = v + sh;
    }
    for (int q = 0; q < a->nops; ++q)
        op_run(a->ops[q], a->op_args[q] ? a->op_args[q][oc] : 0.0f, y + done, np - done, res ? res + done : NULL);
}

#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
static int fma_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* channel mix of one tile with FMA: out[o][i] = [relu](b[o] + sum_c w[o][c] * y[c][i]), 8 pixels
 * per vector and 4 vectors (32 pixels) per pass, so each weight broadcast feeds four FMAs */
__attribute__((target("avx2,fma"))) static void mix_tile_fma(const conv_args *a, const float *y, int np,
                                                             float *out, int64_t ld_out) {
    const int64_t C = a->O;
    for (int64_t o = 0; o < a->mix_out; ++o) {
        const float *w = a->mix_w + o * C;
        const __m256 b = _mm256_set1_ps(a->mix_b[o]);
        int i = 0;
        for (; i + 32 <= np; i += 32) {
            __m256 s0 = b, s1 = b, s2 = b, s3 = b;
            for (int64_t c = 0; c < C; ++c) {
                const __m256 wc = _mm256_set1_ps(w[c]);
                const float *row = y + c * TP + i;
                s0 = _mm256_fmadd_ps(wc, _mm256_loadu_ps(row), s0);
                s1 = _mm256_fmadd_ps(wc, _mm256_loadu_ps(row + 8), s1);
                s2 = _mm256_fmadd_ps(wc, _mm256_loadu_ps(row + 16), s2);
                s3 = _mm256_fmadd_ps(wc, _mm256_loadu_ps(row + 24), s3);
            }
            if (a->mix_relu) {
                const __m256 z = _mm256_setzero_ps();
                s0 = _mm256_max_ps(s0, z); s1 = _mm256_max_ps(s1, z);
                s2 = _mm256_max_ps(s2, z); s3 = _mm256_max_ps(s3, z);
            }
            float *dst = out + o * ld_out + i;
            _mm256_storeu_ps(dst, s0); _mm256_storeu_ps(dst + 8, s1);
            _mm256_storeu_ps(dst + 16, s2); _mm256_storeu_ps(dst + 24, s3);
        }
        for (; i < np; ++i) {
            float acc = a->mix_b[o];
            for (int64_t c = 0; c < C; ++c) acc = fmaf(w[c], y[c * TP + i], acc);
            out[o * ld_out + i] = a->mix_relu && !(acc > 0.0f) ? 0.0f : acc;
        }
    }
}
#endif

static void mix_tile_plain(const conv_args *a, const float *y, int np, float *out, int64_t ld_out) {
    for (int64_t o = 0; o < a->mix_out; ++o) {
        const float *w = a->mix_w + o * a->O;
        for (int i = 0; i < np; ++i) {
            float acc = a->mix_b[o];
            for (int64_t c = 0; c < a->O; ++c) acc += w[c] * y[c * TP + i];
            out[o * ld_out + i] = a->mix_relu && !(acc > 0.0f) ? 0.0f : acc;
        }
    }
}

/* the channel mix of a tile whose epilogue outputs y [O][TP] are done */
static void mix_tile(const conv_args *a, const float *y, int np, float *out, int64_t ld_out) {
#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
    if (a->mix_fma) {
        mix_tile_fma(a, y, np, out, ld_out);
        return;
    }
#endif
    mix_tile_plain(a, y, np, out, ld_out);
}

typedef struct {
    u64 *A;          /* [TP][LW] im2col bits */
    int32_t *P;      /* [OB][TP] popcounts */
    int32_t *inv;    /* [TP][KH*KW] padded taps of border pixels */
    int32_t base[TP];
    int32_t nvalid[TP];
    int32_t border[TP]; /* tile pixels with padded taps */
    float y[TP];
    float r[TP]; /* residual operand row: gathered (listed positions) or the mean of two halves */
    float wgt[TP]; /* gathered accumulation weights (listed positions with acc_weight) */
    int64_t image[TP], pixel[TP]; /* listed positions split into (sample, pixel) once per tile */
    /* the table kernel's vectors of up to 32 neighbouring outputs of one row: plane address of the
     * first, tile index of the first, count (once per tile, shared by its output blocks) */
    const uint8_t *vec_plane[TP];
    int vec_start[TP], vec_count[TP], nvec;
    float *mixin; /* [O][TP] epilogue outputs awaiting the channel mix (mix_w only) */
} tile_buffers;

BZ_INLINE void prefetch_rows(const conv_args *a, int64_t g, int64_t n, int64_t p0, int np, int64_t ob) {
#if defined(__GNUC__)
    const int64_t OHW = a->OH * a->OW;
    const int64_t jmax = (a->OG - ob * OB) < OB ? (a->OG - ob * OB) : OB;
    for (int64_t j = 0; j < jmax; ++j) {
        const int64_t oc = g * a->OG + ob * OB + j;
        const float *out = a->out + (n * a->O + oc) * OHW + p0;
        const float *res = a->residual ? a->residual + (n * (a->res_channels << a->res_halves) + oc % a->res_channels) * OHW + p0 : NULL;
        for (int i = 0; i < np; i += 16) {
            __builtin_prefetch(out + i, 1, 3);
            if (res) __builtin_prefetch(res + i, 0, 3);
        }
    }
#else
    (void)a; (void)g; (void)n; (void)p0; (void)np; (void)ob;
#endif
}

/* ---- the nibble planes (input of the table look-up kernel) ---- */

/* the padding byte of nibble k: 0x80 looks up 0 in every table (exact zero padding); +-1 padding
 * is the nibble of an all +1 pixel (its valid channel bits set) or of an all -1 pixel (0) */
static uint8_t pad_nibble(const conv_args *a, int64_t k) {
    if (a->pad_mode == 0) return 0x80;
    if (a->pad_mode < 0) return 0;
    const int64_t valid = a->CG - 4 * k;
    return valid >= 4 ? 15 : (uint8_t)((1u << valid) - 1);
}

/* count plane bytes of one input row from the floats of 4 channels (rows[j], step sp apart):
 * bit j = rows[j] + bias[j] >= 0 */
BZ_CLONES static void nibble_from_floats(const float *const rows[4], const float bias[4], int64_t sp,
                                         int64_t count, uint8_t *restrict out) {
    const float *restrict r0 = rows[0], *restrict r1 = rows[1], *restrict r2 = rows[2], *restrict r3 = rows[3];
    const float b0 = bias[0], b1 = bias[1], b2 = bias[2], b3 = bias[3];
    if (sp == 1) {
        for (int64_t j = 0; j < count; ++j)
            out[j] = (uint8_t)((r0[j] + b0 >= 0.0f) | ((r1[j] + b1 >= 0.0f) << 1) | ((r2[j] + b2 >= 0.0f) << 2) |
                               ((r3[j] + b3 >= 0.0f) << 3));
    } else {
        for (int64_t j = 0; j < count; ++j)
            out[j] = (uint8_t)((r0[j * sp] + b0 >= 0.0f) | ((r1[j * sp] + b1 >= 0.0f) << 1) |
                               ((r2[j * sp] + b2 >= 0.0f) << 2) | ((r3[j * sp] + b3 >= 0.0f) << 3));
    }
}

/* bytes 0, 2, 4.. to first[], 1, 3, 5.. to second[] */
BZ_CLONES static void deal_pairs(const uint8_t *restrict bytes, int64_t pairs, uint8_t *restrict first,
                                 uint8_t *restrict second) {
    for (int64_t j = 0; j < pairs; ++j) {
        first[j] = bytes[2 * j];
        second[j] = bytes[2 * j + 1];
    }
}

/* input row ih of image n into its padded plane row dst from the floats: each nibble's bytes for the
 * whole row from contiguous reads, then (stride > 1) dealt out to the column phases */
static void plane_row_from_floats(const conv_args *a, int64_t n, int64_t ih, uint8_t *dst) {
    const int64_t W = a->W, SW = a->SW, PW = a->PW;
    uint8_t row_bytes[1024];
    for (int64_t k = 0; k < a->NK; ++k) {
        const int64_t nc = a->CG - 4 * k < 4 ? a->CG - 4 * k : 4; /* channels in this nibble */
        uint8_t *out = dst + k * a->plane_k;
        for (int64_t w0 = 0; w0 < W; w0 += 1024) { /* the row in pieces of up to 1024 pixels */
            const int64_t count = W - w0 < 1024 ? W - w0 : 1024;
            uint8_t *bytes = SW == 1 ? out + w0 + PW : row_bytes;
            /* a nibble of fewer than 4 channels reads its first row in place of the missing ones,
             * with bias -inf: -inf (or NaN) >= 0 is false, so their bits are 0, as packing leaves them */
            const float *rows[4];
            float bias[4];
            for (int64_t j = 0; j < 4; ++j) {
                const int64_t c = 4 * k + (j < nc ? j : 0);
                rows[j] = a->x + n * a->xs_n + c * a->xs_c + (ih * W + w0) * a->xs_p;
                bias[j] = j >= nc ? -INFINITY : a->x_bias ? a->x_bias[c] : 0.0f;
            }
            nibble_from_floats(rows, bias, a->xs_p, count, bytes);
            if (SW == 2) { /* pixels 0, 2, 4.. to one phase, 1, 3, 5.. to the other */
                const int64_t c0 = w0 + PW, pairs = count / 2;
                uint8_t *first = out + (c0 % 2) * a->plane_cols + c0 / 2;
                uint8_t *second = out + ((c0 + 1) % 2) * a->plane_cols + (c0 + 1) / 2;
                deal_pairs(bytes, pairs, first, second);
                if (count & 1) first[pairs] = bytes[count - 1];
                continue;
            }
            for (int64_t phase = 0; SW > 1 && phase < SW; ++phase) {
                const int64_t i0 = ((phase - w0 - PW) % SW + SW) % SW; /* first pixel of this phase */
                uint8_t *to = out + phase * a->plane_cols + (w0 + i0 + PW) / SW;
                for (int64_t i = i0; i < count; i += SW) *to++ = bytes[i];
            }
        }
    }
}

#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
/* byte b of each of 32 words (r[i]: words 4i..4i+3) for b < NB, one vector per byte: the words in
 * order (deal 0), or the even words' bytes in the low half and the odd words' in the high half
 * (deal 1: the two column phases of a stride-2 conv).  A byte transpose: VPSHUFB pairs each word's
 * bytes with its lane neighbour's (16-bit elements), three rounds of 16/32/64-bit unpacks gather
 * byte b of all 16 pairs, and a final shuffle puts the pixels in order.  NB (2, 4 or 8) and deal are
 * constants of each inlined copy, so the unpacks of bytes not needed are dropped. */
__attribute__((target("avx2"), always_inline)) static inline void bytes_of_32_words(const __m256i r[8], const int NB,
                                                                                      const int deal, __m256i v[8]) {
    const __m256i pair = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,
                                          0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    __m256i s[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) s[i] = _mm256_shuffle_epi8(r[i], pair);
    for (int j = 0; j < 4; ++j) { /* t[2j]: bytes 0-3 of words of s[2j], s[2j+1]; t[2j+1]: bytes 4-7 */
        t[2 * j] = _mm256_unpacklo_epi16(s[2 * j], s[2 * j + 1]);
        t[2 * j + 1] = _mm256_unpackhi_epi16(s[2 * j], s[2 * j + 1]);
    }
    for (int h = 0; h < 2; ++h) { /* u[4h..]: bytes 4h, 4h+1 | 4h+2, 4h+3 of s0-3, then of s4-7 */
        u[4 * h] = _mm256_unpacklo_epi32(t[h], t[2 + h]);
        u[4 * h + 1] = _mm256_unpackhi_epi32(t[h], t[2 + h]);
        u[4 * h + 2] = _mm256_unpacklo_epi32(t[4 + h], t[6 + h]);
        u[4 * h + 3] = _mm256_unpackhi_epi32(t[4 + h], t[6 + h]);
    }
    /* byte b in lane 0: words (0, 1), (4, 5) .. (28, 29); lane 1: (2, 3), (6, 7) .. (30, 31) */
    const __m256i order = _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
                                           0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int b = 0; b < NB; ++b) {
        const int q = (b >> 2) * 4 + ((b >> 1) & 1); /* u[q] and u[q + 2] hold byte b */
        __m256i w = (b & 1) ? _mm256_unpackhi_epi64(u[q], u[q + 2]) : _mm256_unpacklo_epi64(u[q], u[q + 2]);
        if (deal)
            w = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(_mm256_shuffle_epi8(w, split), 0xD8), pair);
        else
            w = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(w, 0xD8), order);
        v[b] = w;
    }
}

/* the nibble planes of one input row from its packed words (byte b of a word holds nibbles 2b and
 * 2b + 1), 32 pixels at a time by byte transposes when the stride is 1 or 2 (a word and a nibble
 * pair at a time, this had cost narrow layers up to a sixth of the conv); the last W % 32 pixels,
 * and the rows of wider strides, one byte at a time */
__attribute__((target("avx2"))) static void plane_row_from_words(const conv_args *a, int64_t n, int64_t ih,
                                                                  uint8_t *restrict dst) {
    const int64_t NK = a->NK, k_stride = a->plane_k, SW = a->SW, cols = a->plane_cols, W = a->W, PW = a->PW;
    const int64_t NWG = a->NWG, W32 = SW <= 2 ? W / 32 * 32 : 0;
    const u64 *restrict src = a->in + (n * a->H + ih) * W * NWG;
    const __m256i low = _mm256_set1_epi8(15);
    for (int64_t g = 0; g * 16 < NK; ++g) {
        const int64_t nk = NK - 16 * g < 16 ? NK - 16 * g : 16; /* nibbles of word g */
        const int nb = (int)(nk + 1) / 2;
        for (int64_t w0 = 0; w0 < W32; w0 += 32) {
            __m256i r[8], v[8];
            for (int i = 0; i < 8; ++i) {
                const u64 *p = src + (w0 + 4 * i) * NWG + g;
                r[i] = NWG == 1 ? _mm256_loadu_si256((const __m256i *)p)
                                : _mm256_setr_epi64x((long long)p[0], (long long)p[NWG], (long long)p[2 * NWG],
                                                     (long long)p[3 * NWG]);
            }
            const int deal = SW == 2;
            if (nb <= 2)
                deal ? bytes_of_32_words(r, 2, 1, v) : bytes_of_32_words(r, 2, 0, v);
            else if (nb <= 4)
                deal ? bytes_of_32_words(r, 4, 1, v) : bytes_of_32_words(r, 4, 0, v);
            else
                deal ? bytes_of_32_words(r, 8, 1, v) : bytes_of_32_words(r, 8, 0, v);
            for (int b = 0; b < nb; ++b) {
                const int64_t k = 16 * g + 2 * b;
                const __m256i nib[2] = {_mm256_and_si256(v[b], low),
                                        _mm256_and_si256(_mm256_srli_epi16(v[b], 4), low)};
                for (int h = 0; h < 2 && k + h < NK; ++h) {
                    uint8_t *plane = dst + (k + h) * k_stride;
                    if (!deal) {
                        _mm256_storeu_si256((__m256i *)(plane + w0 + PW), nib[h]);
                    } else { /* even pixels w0 + 2j, then odd ones, to their phases' columns */
                        const int64_t e = w0 + PW, o = w0 + 1 + PW;
                        _mm_storeu_si128((__m128i *)(plane + (e & 1) * cols + e / 2), _mm256_castsi256_si128(nib[h]));
                        _mm_storeu_si128((__m128i *)(plane + (o & 1) * cols + o / 2),
                                         _mm256_extracti128_si256(nib[h], 1));
                    }
                }
            }
        }
    }
    for (int64_t iw = W32; iw < W; ++iw)
        for (int64_t k = 0; k < NK; ++k)
            dst[k * k_stride + ((iw + PW) % SW) * cols + (iw + PW) / SW] =
                (uint8_t)((src[iw * NWG + (k >> 4)] >> ((k & 15) * 4)) & 15);
}
#endif

/* padded row r of image n's planes: the padding bytes, then the input row's nibbles (if r is one) */
static void nibble_plane_row(const conv_args *a, int64_t n, int64_t r) {
    uint8_t *dst = a->planes + n * a->plane_image + r * a->plane_row;
    for (int64_t k = 0; k < a->NK; ++k) memset(dst + k * a->plane_k, pad_nibble(a, k), (size_t)a->plane_k);
    const int64_t ih = r - a->PH;
    if (ih < 0 || ih >= a->H) return;
#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
    if (a->in) { /* planes exist only with AVX2 */
        plane_row_from_words(a, n, ih, dst);
        return;
    }
#endif
    plane_row_from_floats(a, n, ih, dst);
}

/* taps of a kernel along one axis that fall inside the input at output position o */
static int32_t valid_taps(int64_t o, int64_t stride, int64_t pad, int64_t dilation, int64_t kernel, int64_t size) {
    int32_t count = 0;
    for (int64_t q = 0; q < kernel; ++q) {
        const int64_t i = o * stride - pad + q * dilation;
        count += i >= 0 && i < size;
    }
    return count;
}

#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
/* popcounts of output block ob (OB == 8 channels) over the tile's vectors (table_tile), by
 * table look-up: two vectors at a time (4 outputs at a time), an odd last one alone (8 outputs) */
static void nibble_tile_counts(const conv_args *a, const tile_buffers *buf, int64_t ob, int32_t *P) {
    const uint8_t *const *base = buf->vec_plane;
    const int *start = buf->vec_start, *count = buf->vec_count;
    const int nv = buf->nvec;
    const int shared = a->shared_tables;
    const int64_t taps = a->KH * a->KW, table_block = taps * a->NK * (shared ? 4 : 64); /* 4 outputs */
    const uint8_t *tables = a->tables + ob * 2 * table_block; /* outputs 0-3 of the block, then 4-7 */
    int v = 0;
    for (; v + 1 < nv; v += 2)
        for (int half = 0; half < 2; ++half)
            (shared ? nibble_counts_shared : nibble_counts_tables)(
                base[v], base[v + 1], a->tap_offsets, taps, a->NK, a->plane_k, tables + half * table_block,
                P + half * 4 * TP, TP, start[v], count[v], start[v + 1], count[v + 1]);
    if (v < nv)
        (shared ? nibble_counts8_shared : nibble_counts8_tables)(base[v], a->tap_offsets, taps, a->NK, a->plane_k,
                                                                 tables, tables + table_block, P, TP, start[v],
                                                                 count[v]);
}
#else
static void nibble_tile_counts(const conv_args *a, const tile_buffers *buf, int64_t ob, int32_t *P) {
    (void)a; (void)buf; (void)ob; (void)P; /* never called: the planes need AVX2 */
}
#endif

/* the table kernel's view of tile pixels p0.. (np of them) of image n, one output row segment at a
 * time: the epilogue base (valid taps x channels) of each pixel, and the vectors of up to 32
 * neighbouring outputs of one row with the planes' address of each vector's first output (listed
 * once per tile, shared by its output blocks; locals: the stores could alias the fields) */
BZ_CLONES static void table_tile(const conv_args *a, int64_t n, int64_t p0, int np, tile_buffers *buf) {
    const int32_t *restrict valid_rows = a->valid_rows, *restrict valid_cols = a->valid_cols;
    int32_t *restrict base = buf->base;
    const int64_t OW = a->OW;
    const int32_t CG = (int32_t)a->CG;
    int64_t oh = p0 / OW, ow = p0 % OW;
    int nv = 0;
    for (int i = 0; i < np; ++oh, ow = 0) {
        const int32_t row_taps = valid_rows[oh] * CG;
        const int len = (int)(OW - ow < np - i ? OW - ow : np - i);
        int j = 0;
#if defined(__GNUC__)
        for (; j + 8 <= len; j += 8) { /* 8 at a time (the compiler leaves this loop scalar) */
            bz_v8i cols;
            memcpy(&cols, valid_cols + ow + j, sizeof cols);
            cols *= row_taps;
            memcpy(base + i + j, &cols, sizeof cols);
        }
#endif
        for (; j < len; ++j) base[i + j] = row_taps * valid_cols[ow + j];
        const uint8_t *row = a->planes + n * a->plane_image + oh * a->SH * a->plane_row + ow;
        for (j = 0; j < len; j += 32, ++nv) {
            buf->vec_plane[nv] = row + j;
            buf->vec_start[nv] = i + j;
            buf->vec_count[nv] = len - j < 32 ? len - j : 32;
        }
        i += len;
    }
    buf->nvec = nv;
}

/* one tile of np pixels of group g: dense (idx == NULL: pixels p0.. of image n) or listed */
static void conv_tile(const conv_args *a, microkernel_fn mk, word_kernel_fn word_kernel, int pb, int64_t g, int64_t n, int64_t p0,
                      const int64_t *idx, int np, tile_buffers *buf) {
    const int64_t OHW = a->OH * a->OW;
    const int64_t taps = a->KH * a->KW;
    const int64_t row_words = a->G * a->NWG;
    /* a dense 1x1 / stride 1 / unpadded conv reads the packed input in place: no im2col */
    const int direct = !idx && taps == 1 && a->SH == 1 && a->SW == 1 && a->PH == 0 && a->PW == 0;
    const u64 *A = buf->A;
    int64_t lda = a->LW;
    int nborder = 0;
    if (a->planes && !idx) { /* table look-ups: padded taps look up 0, the base counts the valid ones */
        table_tile(a, n, p0, np, buf);
    } else if (direct) {
        A = a->in + (n * OHW + p0) * row_words + g * a->NWG;
        lda = row_words;
        for (int i = 0; i < np; ++i) buf->base[i] = (int32_t)a->CG;
    } else if (!idx) {
        int64_t oh = p0 / a->OW, ow = p0 % a->OW;
        for (int i = 0; i < np; ++i) {
            buf->nvalid[i] = (int32_t)im2col_pixel(a, n, g, oh, ow, buf->A + i * lda, buf->inv + i * taps);
            buf->base[i] = buf->nvalid[i] * (int32_t)a->CG;
            if (buf->nvalid[i] != taps) buf->border[nborder++] = i;
            if (++ow == a->OW) { ow = 0; ++oh; }
        }
    } else {
        for (int i = 0; i < np; ++i) {
            const int64_t gi = idx[i], pix = gi % OHW;
            buf->image[i] = gi / OHW;
            buf->pixel[i] = pix;
            buf->nvalid[i] = (int32_t)im2col_pixel(a, gi / OHW, g, pix / a->OW, pix % a->OW,
                                                   buf->A + i * lda, buf->inv + i * taps);
            buf->base[i] = buf->nvalid[i] * (int32_t)a->CG;
            if (buf->nvalid[i] != taps) buf->border[nborder++] = i;
            if (a->acc_weight) buf->wgt[i] = a->acc_weight[gi];
        }
    }
    const int64_t nblocks = a->OGP / OB;
    for (int64_t ob = 0; ob < nblocks; ++ob) {
        const u64 *Wb = a->w + (g * nblocks + ob) * a->LW * OB;
        if (!idx && !a->mix_w) /* the block's output rows (and residual rows) are far apart in memory:
                                * one stream per channel, more than the hardware prefetchers follow;
                                * ask for them now so they arrive while the popcounts run */
            prefetch_rows(a, g, n, p0, np, ob);
        if (a->planes && !idx) {
            nibble_tile_counts(a, buf, ob, buf->P);
        } else if (word_kernel) {
            word_kernel(A, lda, np, Wb, buf->P, TP);
        } else {
            for (int i0 = 0; i0 < np; i0 += pb) {
                const int npix = (np - i0) < pb ? (np - i0) : pb;
                mk(A + i0 * lda, lda, npix, Wb, a->LW, buf->P + i0, TP);
            }
        }
        const int jmax = (a->OG - ob * OB) < OB ? (int)(a->OG - ob * OB) : OB;
        for (int j = 0; j < jmax; ++j) {
            const int64_t o = ob * OB + j;
            const int64_t oc = g * a->OG + o;
            int32_t *popc = buf->P + j * TP;
            if (nborder && a->pad_mode == 0) { /* add back the padded taps' weight popcounts */
                const int32_t *wpc_o = a->wpc + (g * a->OGP + o) * taps;
                for (int b = 0; b < nborder; ++b) {
                    const int i = buf->border[b];
                    const int32_t *inv = buf->inv + i * taps;
                    const int32_t ninvalid = (int32_t)taps - buf->nvalid[i];
                    int32_t correction = 0; /* in a register: popc may alias wpc for the compiler */
                    for (int32_t q = 0; q < ninvalid; ++q) correction += wpc_o[inv[q]];
                    popc[i] -= correction;
                }
            }
            const int64_t rc = a->residual ? oc % a->res_channels : 0;
            const int64_t rsc = a->res_channels << a->res_halves; /* residual channels per sample */
            if (!idx) {
                const float *res = a->residual ? a->residual + (n * rsc + rc) * OHW + p0 : NULL;
                if (res && a->res_halves) {
                    const float *second = res + a->res_channels * OHW;
                    for (int i = 0; i < np; ++i) buf->r[i] = (res[i] + second[i]) * 0.5f;
                    res = buf->r;
                }
                float *row = a->mix_w ? buf->mixin + oc * TP : a->out + (n * a->O + oc) * OHW + p0;
                epilogue_row(a, oc, popc, buf->base, np, row, res);
            } else {
                if (a->residual)
                    for (int i = 0; i < np; ++i) {
                        const float *r = a->residual + (buf->image[i] * rsc + rc) * OHW + buf->pixel[i];
                        buf->r[i] = a->res_halves ? (r[0] + r[a->res_channels * OHW]) * 0.5f : r[0];
                    }
                epilogue_row(a, oc, popc, buf->base, np, buf->y, buf->r);
                if (a->acc_weight) { /* (y * weight) + out, rounded as the two torch operations */
                    for (int i = 0; i < np; ++i) {
                        float *dst = a->out + (buf->image[i] * a->O + oc) * OHW + buf->pixel[i];
                        const float product = buf->y[i] * buf->wgt[i];
                        *dst = product + *dst;
                    }
                } else {
                    for (int i = 0; i < np; ++i) a->out[(buf->image[i] * a->O + oc) * OHW + buf->pixel[i]] = buf->y[i];
                }
            }
        }
    }
    if (a->mix_w && !idx) /* every channel of the tile is done (G == 1): the 1x1 conv after it */
        mix_tile(a, buf->mixin, np, a->out + n * a->mix_out * OHW + p0, OHW);
    if (a->out_bits && !idx) { /* the tile's outputs of every channel are done (G == 1): pack them */
        const int64_t nwo = (a->O + 63) / 64;
        for (int i0 = 0; i0 < np; i0 += PACK_PIXELS) /* a tile may hold more pixels than one pack call */
            for (int64_t j = 0; j < nwo; ++j) {
                const int64_t c0 = 64 * j, nc = (a->O - c0) < 64 ? (a->O - c0) : 64;
                const int64_t p = p0 + i0, count = np - i0 < PACK_PIXELS ? np - i0 : PACK_PIXELS;
                pack_block(a->out + (n * a->O + c0) * OHW + p, OHW, 1, nc, count,
                           a->out_bias ? a->out_bias + c0 : NULL, a->out_bits + (n * OHW + p) * nwo + j, nwo);
            }
    }
}

static void conv_run(const conv_args *a, int nthreads) {
    /* the table kernel counts dense ungrouped calls given tables; the hybrid kernel all others */
    const int kernel = best_kernel() == BZ_KERNEL_AVX2_NIBBLE ? BZ_KERNEL_AVX2_HYBRID : best_kernel();
    const microkernel_fn mk = select_microkernel(kernel);
    const word_kernel_fn word_kernel = select_word_kernel(kernel, a->LW);
    const int pb = kernel == BZ_KERNEL_AVX2_HYBRID ? 5 : PB;
    const int64_t OHW = a->OH * a->OW;
    const int64_t npix = a->positions ? a->npos : a->N * OHW;
    const double work = (double)npix * (double)a->G * (double)a->OGP * (double)(a->LW + 2);
    const int parallel = nthreads > 1 && work >= BZ_CONV_PARALLEL_MIN;
    /* TP pixels per tile on dense maps at least TP wide (fewer, longer tiles: fewer set-ups and
     * prefetch rounds per output row), TP / 2 elsewhere (on 64x36 and smaller maps the longer tiles
     * measured slower); smaller ones (multiples of 8) when there would be too few to keep every
     * thread busy to the end: small maps with many channels (a 576-pixel map is 9 tiles, so one of
     * two threads would wait for a whole tile's work) */
    const int64_t tile = !a->positions && a->OW >= TP ? TP : TP / 2;
    int64_t tp = tile;
    if (parallel && (npix + tile - 1) / tile < 8 * (int64_t)nthreads) {
        const int64_t step = a->planes ? 32 : 8; /* the table kernel counts vectors of 32 outputs */
        tp = (npix + 8 * nthreads - 1) / (8 * nthreads);
        tp = (tp + step - 1) / step * step;
        if (tp < step) tp = step;
        if (tp > tile) tp = tile;
    }
    /* dense: tiles never cross an image, so each output row segment is contiguous */
    const int64_t tiles_per_image = (OHW + tp - 1) / tp;
    const int64_t ntiles = a->positions ? (a->npos + tp - 1) / tp : a->N * tiles_per_image;
    const int64_t njobs = ntiles * a->G;
    (void)parallel; /* unused without OpenMP */
#pragma omp parallel num_threads(clamp_threads(nthreads)) if (parallel)
    {
        tile_buffers buf;
        buf.A = (u64 *)malloc(sizeof(u64) * (size_t)(TP * a->LW + 1));
        buf.P = (int32_t *)malloc(sizeof(int32_t) * (size_t)(OB * TP));
        buf.inv = (int32_t *)malloc(sizeof(int32_t) * (size_t)(TP * a->KH * a->KW));
        buf.mixin = a->mix_w ? (float *)malloc(sizeof(float) * (size_t)(TP * a->O)) : NULL;
        int64_t job;
        if (a->planes) { /* the table kernel's input first (the loop ends with a barrier) */
            const int64_t rows = a->plane_image / a->plane_row;
            int64_t r;
#pragma omp for schedule(static)
            for (r = 0; r < a->N * rows; ++r) nibble_plane_row(a, r / rows, r % rows);
        }
#pragma omp for schedule(dynamic, 1)
        for (job = 0; job < njobs; ++job) {
            const int64_t g = job / ntiles, t = job % ntiles;
            if (!buf.A || !buf.P || !buf.inv || (a->mix_w && !buf.mixin)) continue;
            if (a->positions) {
                const int64_t start = t * tp;
                const int np = (int)((a->npos - start) < tp ? (a->npos - start) : tp);
                conv_tile(a, mk, word_kernel, pb, g, 0, 0, a->positions + start, np, &buf);
            } else {
                const int64_t n = t / tiles_per_image, p0 = (t % tiles_per_image) * tp;
                const int np = (int)((OHW - p0) < tp ? (OHW - p0) : tp);
                conv_tile(a, mk, word_kernel, pb, g, n, p0, NULL, np, &buf);
            }
        }
        free(buf.A);
        free(buf.P);
        free(buf.inv);
        free(buf.mixin);
    }
}

/* use the tables (and allocate their planes) when the call and the CPU allow it: dense, ungrouped,
 * the AVX2 table kernel selected, and counts that fit 16 bits.  Returns -2 when out of memory. */
static int nibble_setup(conv_args *a, const uint8_t *tables, int shared_tables) {
    if (!tables || a->positions || a->G != 1 || best_kernel() != BZ_KERNEL_AVX2_NIBBLE ||
        a->KH * a->KW * a->CG > 65535)
        return 0;
    const int64_t rows = a->H + 2 * a->PH, cols = (a->W + 2 * a->PW + a->SW - 1) / a->SW;
    a->NK = (a->CG + 3) / 4;
    a->plane_cols = cols;
    a->plane_k = a->SW * cols;
    a->plane_row = a->NK * a->plane_k;
    a->plane_image = rows * a->plane_row;
    const size_t bytes = (size_t)(a->N * a->plane_image) + 64; /* vectors may read 31 bytes past the end */
    a->planes = (uint8_t *)malloc(bytes);
    a->tap_offsets = (int64_t *)malloc(sizeof(int64_t) * (size_t)(a->KH * a->KW));
    a->valid_rows = (int32_t *)malloc(sizeof(int32_t) * (size_t)(a->OH + a->OW));
    if (!a->planes || !a->tap_offsets || !a->valid_rows) return -2;
    a->valid_cols = a->valid_rows + a->OH;
    for (int64_t o = 0; o < a->OH; ++o)
        a->valid_rows[o] = a->pad_mode ? (int32_t)a->KH : valid_taps(o, a->SH, a->PH, a->DH, a->KH, a->H);
    for (int64_t o = 0; o < a->OW; ++o)
        a->valid_cols[o] = a->pad_mode ? (int32_t)a->KW : valid_taps(o, a->SW, a->PW, a->DW, a->KW, a->W);
    memset(a->planes + bytes - 64, 0x80, 64);
    for (int64_t kh = 0; kh < a->KH; ++kh)
        for (int64_t kw = 0; kw < a->KW; ++kw) {
            const int64_t c = kw * a->DW;
            a->tap_offsets[kh * a->KW + kw] = kh * a->DH * a->plane_row + (c % a->SW) * cols + c / a->SW;
        }
    a->tables = tables;
    a->shared_tables = shared_tables;
    return 0;
}

/*
 * Binary convolution of packed input `in` ([N][H*W][G][NWG]) with packed weights `w`
 * ([G][OGP/8][LW][8]).  Output float NCHW [N][O][OH][OW]: y = apply_ops(dot*scale + shift).
 * in may be NULL: the input is then the floats x[n*xs_n + c*xs_c + pixel*xs_p], binarized as
 * x + x_bias >= 0 (x_bias nullable) while the kernel reads them (no packed copy for the tables).
 * tables (nullable, G == 1): the weights' nibble tables [OGP/4][KH*KW][ceil(CG/4)][4][16]
 * (table_entry 16) or their selectors [OGP/4][KH*KW][ceil(CG/4)][4] (table_entry 1; see conv_args),
 * used by the AVX2 table kernel on dense calls.
 * positions (nullable): compute only these flattened (n*OH*OW + pixel) outputs; others untouched.
 * acc_weight (nullable, with positions only, [N][OH*OW]): add instead of store, out = y * acc_weight + out.
 * residual (nullable, [N][res_channels][OH][OW]): the operand of BZ_OP_RESIDUAL ops; with res_halves
 * it has 2 * res_channels channels and the operand is the mean of the two halves.
 * mix_w (nullable, dense and G == 1 only): a full-precision 1x1 conv after the epilogue, so `out` has
 * mix_out channels: out = [relu if mix_relu](mix_w [mix_out][O] @ y + mix_b).
 * out_bits (nullable, dense and G == 1 only): the output packed again, bit = y + out_bias >= 0,
 * [N][OH*OW][ceil(O/64)] words, so a following binary layer need not pack it.
 * Returns 0 on success, -1 on invalid arguments, -2 when out of memory was detected.
 */
BZ_EXPORT int bz_conv(const u64 *in, const float *x, int64_t xs_n, int64_t xs_c, int64_t xs_p, const float *x_bias,
                      int64_t N, int64_t H, int64_t W, int64_t G, int64_t CG,
                      const u64 *w, const int32_t *wpc, const uint8_t *tables, int table_entry, int64_t O,
                      int64_t OGP, int64_t KH,
                      int64_t KW, int64_t SH, int64_t SW, int64_t PH, int64_t PW, int64_t DH,
                      int64_t DW, int pad_mode, int64_t OH, int64_t OW, const float *scale,
                      const float *shift, int nops, const int *ops, const float *const *op_args,
                      const float *residual, int64_t res_channels, int res_halves, float *out, const int64_t *positions,
                      int64_t npos, const float *acc_weight, u64 *out_bits, const float *out_bias, const float *mix_w,
                      const float *mix_b, int64_t mix_out, int mix_relu, int nthreads) {
    conv_args a;
    memset(&a, 0, sizeof(a));
    if (G <= 0 || CG <= 0 || O % G != 0 || OGP % OB != 0 || nops < 0 || nops > BZ_MAX_OPS) return -1;
    if (!in && !x) return -1;
    if (tables && table_entry != 1 && table_entry != 16) return -1;
    a.in = in; a.N = N; a.H = H; a.W = W; a.G = G; a.CG = CG; a.NWG = (CG + 63) / 64;
    a.x = x; a.x_bias = x_bias; a.xs_n = xs_n; a.xs_c = xs_c; a.xs_p = xs_p;
    a.w = w; a.wpc = wpc; a.O = O; a.OG = O / G; a.OGP = OGP;
    a.LW = (KH * KW * CG + 63) / 64;
    a.KH = KH; a.KW = KW; a.SH = SH; a.SW = SW; a.PH = PH; a.PW = PW; a.DH = DH; a.DW = DW;
    a.pad_mode = pad_mode; a.OH = OH; a.OW = OW;
    a.scale = scale; a.shift = shift; a.nops = nops;
    for (int q = 0; q < nops; ++q) { a.ops[q] = ops[q]; a.op_args[q] = op_args[q]; }
    a.out = out; a.positions = positions; a.npos = npos; a.acc_weight = acc_weight;
    a.residual = residual; a.res_channels = res_channels; a.res_halves = res_halves ? 1 : 0;
    a.out_bits = out_bits; a.out_bias = out_bias;
    if (a.OG > a.OGP) return -1;
    if (residual && (res_channels <= 0 || O % res_channels != 0)) return -1;
    for (int q = 0; q < nops; ++q)
        if (ops[q] == BZ_OP_RESIDUAL && !residual) return -1;
    if (out_bits && (G != 1 || positions)) return -1;
    if (acc_weight && !positions) return -1;
    if (mix_w && (G != 1 || positions || out_bits || !mix_b || mix_out < 1)) return -1;
    a.mix_w = mix_w; a.mix_b = mix_b; a.mix_out = mix_out; a.mix_relu = mix_relu;
    a.chain = chain_kind(&a);
#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
    a.mix_fma = mix_w ? fma_available() : 0;
#endif
    int status = nibble_setup(&a, tables, table_entry == 1);
    u64 *packed = NULL;
    if (status == 0 && !a.in && !a.planes) { /* float input for the popcount kernels: pack it first */
        packed = (u64 *)malloc(sizeof(u64) * (size_t)(N * H * W * G * a.NWG + 1));
        if (packed) bz_pack(x, N, G * CG, H * W, xs_n, xs_c, xs_p, x_bias, G, packed, nthreads);
        a.in = packed;
        status = packed ? 0 : -2;
    }
    if (status == 0) conv_run(&a, nthreads);
    free(packed);
    free(a.planes);
    free(a.tap_offsets);
    free(a.valid_rows);
    return status;
}
/* ------------------------------------------------------------------------------------------ */
/* Per-channel elementwise chains (shift, scale, PReLU, ReLU) in one pass over a float map      */
/* ------------------------------------------------------------------------------------------ */

BZ_CLONES static void pointwise_row(const float *src, float *dst, int64_t np, int nops, const int *ops,
                                    const float *const *args, int64_t c) {
    if (dst != src) memcpy(dst, src, sizeof(float) * (size_t)np);
    for (int q = 0; q < nops; ++q) {
        const float v = args[q] ? args[q][c] : 0.0f;
        switch (ops[q]) {
        case BZ_OP_ADD: for (int64_t i = 0; i < np; ++i) dst[i] = dst[i] + v; break;
        case BZ_OP_MUL: for (int64_t i = 0; i < np; ++i) dst[i] = dst[i] * v; break;
        case BZ_OP_PRELU: prelu_run(dst, np, v); break;
        case BZ_OP_RELU: for (int64_t i = 0; i < np; ++i) dst[i] = dst[i] > 0.0f ? dst[i] : 0.0f; break;
        case BZ_OP_SIGMOID: for (int64_t i = 0; i < np; ++i) dst[i] = bz_sigmoidf(dst[i]); break;
        case BZ_OP_TANH: for (int64_t i = 0; i < np; ++i) dst[i] = bz_tanhf(dst[i]); break;
        default: break;
        }
    }
}

/* out = (1 - z) * h + z * c over n contiguous floats (a GRU's state update), each product and sum
 * rounded as PyTorch's separate operations round them (no fused multiply-add) */
BZ_CLONES static void gru_update_run(const float *h, const float *z, const float *c, float *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const float keep = (1.0f - z[i]) * h[i];
        const float take = z[i] * c[i];
        out[i] = keep + take;
    }
}

BZ_EXPORT int bz_gru_update(const float *h, const float *z, const float *c, float *out, int64_t n, int nthreads) {
    if (n < 0) return -1;
    const int64_t chunk = 16384;
    const int64_t nchunks = (n + chunk - 1) / chunk;
    const int parallel = nthreads > 1 && n >= BZ_PACK_PARALLEL_MIN;
    (void)parallel;
    int64_t k;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(nthreads)) if (parallel)
    for (k = 0; k < nchunks; ++k) {
        const int64_t start = k * chunk, len = (n - start) < chunk ? (n - start) : chunk;
        gru_update_run(h + start, z + start, c + start, out + start, len);
    }
    return 0;
}

/* out[n][c][p] = ops(x[n][c][p]) for a contiguous [N][C][P] float tensor (out may equal x) */
BZ_EXPORT int bz_pointwise(const float *x, float *out, int64_t N, int64_t C, int64_t P, int nops,
                           const int *ops, const float *const *args, int nthreads) {
    if (nops < 0 || nops > BZ_MAX_OPS) return -1;
    const int64_t chunk = 4096;
    const int64_t chunks = (P + chunk - 1) / chunk;
    const int parallel = nthreads > 1 && N * C * P >= BZ_PACK_PARALLEL_MIN;
    (void)parallel; /* unused without OpenMP */
    int64_t job;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(nthreads)) if (parallel)
    for (job = 0; job < N * C * chunks; ++job) {
        const int64_t row = job / chunks, p0 = (job % chunks) * chunk;
        const int64_t np = (P - p0) < chunk ? (P - p0) : chunk;
        pointwise_row(x + row * P + p0, out + row * P + p0, np, nops, ops, args, row % C);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Resampling: 2x2 average pooling (ceil mode) and 2x bilinear up-sampling of float maps         */
/* ------------------------------------------------------------------------------------------ */

/* One output row of a 2x2 / stride-2 average pool with ceil mode and no padding: each window's
 * valid values are summed in PyTorch's order (row by row, left to right) and divided by their
 * count, so the result equals torch's avg_pool2d bit for bit.  r1 is NULL on a last, odd row. */
BZ_CLONES static void avgpool_row(const float *r0, const float *r1, float *dst, int64_t W) {
    const int64_t full = W / 2;
    if (r1) {
        for (int64_t o = 0; o < full; ++o) {
            float s = r0[2 * o];
            s += r0[2 * o + 1];
            s += r1[2 * o];
            s += r1[2 * o + 1];
            dst[o] = s / 4.0f;
        }
        if (W & 1) { float s = r0[W - 1]; s += r1[W - 1]; dst[full] = s / 2.0f; }
    } else {
        for (int64_t o = 0; o < full; ++o) {
            float s = r0[2 * o];
            s += r0[2 * o + 1];
            dst[o] = s / 2.0f;
        }
        if (W & 1) dst[full] = r0[W - 1];
    }
}

/* out [NC][ceil(H/2)][ceil(W/2)] = 2x2 average of x [NC][H][W] (ceil mode, padding excluded) */
BZ_EXPORT int bz_avgpool2x2(const float *x, float *out, int64_t NC, int64_t H, int64_t W, int nthreads) {
    if (NC < 0 || H < 1 || W < 1) return -1;
    const int64_t OH = (H + 1) / 2, OW = (W + 1) / 2;
    const int parallel = nthreads > 1 && NC * H * W >= BZ_PACK_PARALLEL_MIN;
    (void)parallel;
    int64_t job;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(nthreads)) if (parallel)
    for (job = 0; job < NC * OH; ++job) {
        const int64_t plane = job / OH, oh = job % OH;
        const float *r0 = x + (plane * H + 2 * oh) * W;
        avgpool_row(r0, 2 * oh + 1 < H ? r0 + W : NULL, out + job * OW, W);
    }
    return 0;
}

/* Source rows h0, h1 and weights of output row oh of a 2x bilinear up-sampling of H rows
 * (align_corners=False: 0.25 / 0.75, the first row copies row 0, the last row is clamped). */
static void upsample_source_rows(int64_t oh, int64_t H, int64_t *h0, int64_t *h1, float *lh0, float *lh1) {
    if (oh == 0) { *h0 = 0; *lh0 = 1.0f; *lh1 = 0.0f; }
    else if (oh & 1) { *h0 = oh / 2; *lh0 = 0.75f; *lh1 = 0.25f; }
    else { *h0 = oh / 2 - 1; *lh0 = 0.25f; *lh1 = 0.75f; }
    *h1 = *h0 + (*h0 < H - 1 ? 1 : 0);
}

/* One output row of the 2x bilinear up-sampling (align_corners=False): the weights of a 2x
 * scale are 0.25 / 0.75 (1 / 0 on the first row and column), computed as PyTorch does:
 * lh0 * (lw0 * a + lw1 * b) + lh1 * (lw0 * c + lw1 * d). */
BZ_CLONES static void upsample_row(const float *r0, const float *r1, float lh0, float lh1, float *dst,
                                   int64_t W) {
    /* first output column: source column 0 with weights (1, 0) */
    dst[0] = lh0 * (1.0f * r0[0] + 0.0f * r0[W > 1 ? 1 : 0]) + lh1 * (1.0f * r1[0] + 0.0f * r1[W > 1 ? 1 : 0]);
    for (int64_t i = 0; i + 1 < W; ++i) {
        /* output 2i+1: columns (i, i+1) weights (0.75, 0.25); output 2i+2: same columns, (0.25, 0.75) */
        const float a = r0[i], b = r0[i + 1], c = r1[i], d = r1[i + 1];
        dst[2 * i + 1] = lh0 * (0.75f * a + 0.25f * b) + lh1 * (0.75f * c + 0.25f * d);
        dst[2 * i + 2] = lh0 * (0.25f * a + 0.75f * b) + lh1 * (0.25f * c + 0.75f * d);
    }
    /* last output column: source column W-1 twice, weights (0.75, 0.25) */
    const float a = r0[W - 1], c = r1[W - 1];
    dst[2 * W - 1] = lh0 * (0.75f * a + 0.25f * a) + lh1 * (0.75f * c + 0.25f * c);
}

/* out [NC][2H][2W] = bilinear 2x up-sampling of x [NC][H][W] (align_corners=False, scale 2);
 * out may have a larger plane stride (out_plane >= 4HW) to write into a concatenation. */
BZ_EXPORT int bz_upsample2x(const float *x, float *out, int64_t NC, int64_t H, int64_t W, int64_t out_plane,
                            int nthreads) {
    if (NC < 0 || H < 1 || W < 1 || out_plane < 4 * H * W) return -1;
    const int64_t OH = 2 * H, OW = 2 * W;
    const int parallel = nthreads > 1 && NC * OH * OW >= BZ_PACK_PARALLEL_MIN;
    (void)parallel;
    int64_t job;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(nthreads)) if (parallel)
    for (job = 0; job < NC * OH; ++job) {
        const int64_t plane = job / OH, oh = job % OH;
        int64_t h0, h1;
        float lh0, lh1;
        upsample_source_rows(oh, H, &h0, &h1, &lh0, &lh1);
        const float *src = x + plane * H * W;
        upsample_row(src + h0 * W, src + h1 * W, lh0, lh1, out + plane * out_plane + oh * OW, W);
    }
    return 0;
}

/*
 * Packs cat([upsample2x(low), skip_0, ..., skip_{K-1}], dim=1) without building it: low is
 * [N][CL][h][w], skip k is [N][SC_k][2h][2w] (all contiguous).  The up-sampled values are those of
 * bz_upsample2x, so the bits equal packing the concatenation.  For each of nb biases (nullable
 * entries: no shift) outs[b] receives [N][4hw][ceil(C/64)] words, bit = value + bias >= 0.
 */
/* Pack cat([upsample2x(low), *parts], 1) for nb input shifts in one pass over the parts: the
 * concatenation (and the up-sampled map) is never built.  low [N][CL][OH/2][OW/2] (CL may be 0);
 * part k [N][part_channels[k]][OH][OW]; outs[b] [N][OH*OW][ceil(C/64)] words. */
static int concat_pack_run(const float *low, int64_t N, int64_t CL, int64_t h, int64_t w, int64_t OH, int64_t OW,
                           int nparts, const float *const *parts, const int64_t *part_channels, int nb,
                           const float *const *biases, u64 *const *outs, int nthreads) {
    if (N < 1 || CL < 0 || OH < 1 || OW < 1 || nparts < 0 || nparts > 8 || nb < 1 || nb > 4) return -1;
    int64_t C = CL;
    for (int k = 0; k < nparts; ++k) {
        if (part_channels[k] < 1) return -1;
        C += part_channels[k];
    }
    if (C < 1) return -1;
    const int64_t P = OH * OW, NW = (C + 63) / 64;
    const int parallel = nthreads > 1 && N * C * P >= BZ_PACK_PARALLEL_MIN;
    (void)parallel;
    int status = 0;
#pragma omp parallel num_threads(clamp_threads(nthreads)) if (parallel)
    {
        float *up = (float *)malloc(sizeof(float) * (size_t)(CL * OW + 1));
        const float **rows = (const float **)malloc(sizeof(float *) * (size_t)C);
        if (!up || !rows) {
#pragma omp atomic write
            status = -2;
        } else {
            int64_t job;
#pragma omp for schedule(static)
            for (job = 0; job < N * OH; ++job) {
                const int64_t n = job / OH, oh = job % OH;
                if (CL) {
                    int64_t h0, h1;
                    float lh0, lh1;
                    upsample_source_rows(oh, h, &h0, &h1, &lh0, &lh1);
                    for (int64_t c = 0; c < CL; ++c) {
                        const float *src = low + (n * CL + c) * h * w;
                        upsample_row(src + h0 * w, src + h1 * w, lh0, lh1, up + c * OW, w);
                        rows[c] = up + c * OW;
                    }
                }
                int64_t c = CL;
                for (int k = 0; k < nparts; ++k)
                    for (int64_t j = 0; j < part_channels[k]; ++j, ++c)
                        rows[c] = parts[k] + ((n * part_channels[k] + j) * OH + oh) * OW;
                for (int64_t p0 = 0; p0 < OW; p0 += PACK_PIXELS) {
                    const int64_t np = (OW - p0) < PACK_PIXELS ? (OW - p0) : PACK_PIXELS;
                    const float *block[64];
                    for (int64_t wd = 0; wd < NW; ++wd) {
                        const int64_t c0 = 64 * wd, nc = (C - c0) < 64 ? (C - c0) : 64;
                        for (int64_t q = 0; q < nc; ++q) block[q] = rows[c0 + q] + p0;
                        for (int b = 0; b < nb; ++b)
                            pack_rows(block, 1, nc, np, biases[b] ? biases[b] + c0 : NULL,
                                      outs[b] + (n * P + oh * OW + p0) * NW + wd, NW);
                    }
                }
            }
        }
        free(up);
        free(rows);
    }
    return status;
}

BZ_EXPORT int bz_upsample_concat_pack(const float *low, int64_t N, int64_t CL, int64_t h, int64_t w, int nskips,
                                      const float *const *skips, const int64_t *skip_channels, int nb,
                                      const float *const *biases, u64 *const *outs, int nthreads) {
    if (h < 1 || w < 1) return -1;
    return concat_pack_run(low, N, CL, h, w, 2 * h, 2 * w, nskips, skips, skip_channels, nb, biases, outs,
                           nthreads);
}

/* Pack cat(parts, 1) (each [N][part_channels[k]][H][W]) for nb input shifts, without building it. */
BZ_EXPORT int bz_concat_pack(int64_t N, int64_t H, int64_t W, int nparts, const float *const *parts,
                             const int64_t *part_channels, int nb, const float *const *biases, u64 *const *outs,
                             int nthreads) {
    if (nparts < 1) return -1;
    return concat_pack_run(NULL, N, 0, 1, 1, H, W, nparts, parts, part_channels, nb, biases, outs, nthreads);
}

/* ------------------------------------------------------------------------------------------ */
/* Sparse full-precision convolution (stride 1, zero padding) at a list of output positions     */
/* ------------------------------------------------------------------------------------------ */

/* One output position: acc[o] = bias[o] + sum over channels and valid taps of w * x, with the
 * weight laid out [C][KH][KW][O] so the inner loop over output channels is contiguous.  Up to 32
 * output channels (a multiple of 8) stay in vector registers. */
BZ_CLONES static void sparse_fconv_point(const float *restrict x, int64_t C, int64_t H, int64_t W,
                                         const float *restrict w, const float *restrict bias, int64_t O,
                                         int64_t KH, int64_t KW, int64_t PH, int64_t PW, int64_t DH, int64_t DW,
                                         int64_t oh, int64_t ow, float *restrict acc) {
#if defined(__GNUC__)
    if (O % 8 == 0 && O <= 32) {
        const int nv = (int)(O / 8);
        bz_v8f a[4];
        for (int v = 0; v < nv; ++v) memcpy(&a[v], bias + 8 * v, sizeof a[v]);
        for (int64_t kh = 0; kh < KH; ++kh) {
            const int64_t ih = oh - PH + kh * DH;
            if (ih < 0 || ih >= H) continue;
            for (int64_t kw = 0; kw < KW; ++kw) {
                const int64_t iw = ow - PW + kw * DW;
                if (iw < 0 || iw >= W) continue;
                const float *src = x + ih * W + iw;
                const float *wt = w + (kh * KW + kw) * O;
                for (int64_t c = 0; c < C; ++c) {
                    const float v = src[c * H * W];
                    const float *wc = wt + c * KH * KW * O;
                    for (int q = 0; q < nv; ++q) {
                        bz_v8f wv;
                        memcpy(&wv, wc + 8 * q, sizeof wv);
                        a[q] += wv * v;
                    }
                }
            }
        }
        for (int v = 0; v < nv; ++v) memcpy(acc + 8 * v, &a[v], sizeof a[v]);
        return;
    }
#endif
    for (int64_t o = 0; o < O; ++o) acc[o] = bias[o];
    for (int64_t c = 0; c < C; ++c) {
        const float *plane = x + c * H * W;
        for (int64_t kh = 0; kh < KH; ++kh) {
            const int64_t ih = oh - PH + kh * DH;
            if (ih < 0 || ih >= H) continue;
            for (int64_t kw = 0; kw < KW; ++kw) {
                const int64_t iw = ow - PW + kw * DW;
                if (iw < 0 || iw >= W) continue;
                const float v = plane[ih * W + iw];
                const float *wt = w + ((c * KH + kh) * KW + kw) * O;
                for (int64_t o = 0; o < O; ++o) acc[o] += wt[o] * v;
            }
        }
    }
}

#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
/* Four positions whose windows lie inside the map, 8 or 16 output channels (nv = O / 8): each
 * weight vector loaded once feeds four positions' fused multiply-adds, with all accumulators in
 * registers.  src[i] points at position i's window origin in channel 0. */
__attribute__((target("avx2,fma"))) static void sparse_fconv_quad(const float *const src[4], int64_t HW,
                                                                   int64_t C, const float *restrict w,
                                                                   const float *restrict bias, int nv,
                                                                   int64_t KH, int64_t KW, int64_t step_h,
                                                                   int64_t step_w, float acc[4][16]) {
    __m256 a00 = _mm256_loadu_ps(bias), a10 = a00, a20 = a00, a30 = a00;
    __m256 a01 = nv > 1 ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps(), a11 = a01, a21 = a01, a31 = a01;
    const int64_t O = 8 * nv;
    for (int64_t kh = 0; kh < KH; ++kh)
        for (int64_t kw = 0; kw < KW; ++kw) {
            const int64_t off = kh * step_h + kw * step_w;
            const float *p0 = src[0] + off, *p1 = src[1] + off, *p2 = src[2] + off, *p3 = src[3] + off;
            const float *wt = w + (kh * KW + kw) * O;
            const int64_t wstep = KH * KW * O;
            if (nv == 2) {
                for (int64_t c = 0; c < C; ++c, wt += wstep) {
                    const __m256 w0 = _mm256_loadu_ps(wt), w1 = _mm256_loadu_ps(wt + 8);
                    const int64_t e = c * HW;
                    __m256 v = _mm256_broadcast_ss(p0 + e);
                    a00 = _mm256_fmadd_ps(w0, v, a00); a01 = _mm256_fmadd_ps(w1, v, a01);
                    v = _mm256_broadcast_ss(p1 + e);
                    a10 = _mm256_fmadd_ps(w0, v, a10); a11 = _mm256_fmadd_ps(w1, v, a11);
                    v = _mm256_broadcast_ss(p2 + e);
                    a20 = _mm256_fmadd_ps(w0, v, a20); a21 = _mm256_fmadd_ps(w1, v, a21);
                    v = _mm256_broadcast_ss(p3 + e);
                    a30 = _mm256_fmadd_ps(w0, v, a30); a31 = _mm256_fmadd_ps(w1, v, a31);
                }
            } else {
                for (int64_t c = 0; c < C; ++c, wt += wstep) {
                    const __m256 w0 = _mm256_loadu_ps(wt);
                    const int64_t e = c * HW;
                    a00 = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(p0 + e), a00);
                    a10 = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(p1 + e), a10);
                    a20 = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(p2 + e), a20);
                    a30 = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(p3 + e), a30);
                }
            }
        }
    _mm256_storeu_ps(acc[0], a00); _mm256_storeu_ps(acc[1], a10);
    _mm256_storeu_ps(acc[2], a20); _mm256_storeu_ps(acc[3], a30);
    if (nv == 2) {
        _mm256_storeu_ps(acc[0] + 8, a01); _mm256_storeu_ps(acc[1] + 8, a11);
        _mm256_storeu_ps(acc[2] + 8, a21); _mm256_storeu_ps(acc[3] + 8, a31);
    }
}

#endif

/* one position's O outputs (+ ReLU) into dst (stride OHW between channels): stored, or with a weight
 * (acc_weight) added as (y * weight) + dst, rounded as the two torch operations */
BZ_INLINE void fconv_store(float *dst, int64_t OHW, const float *acc, int64_t O, int relu, const float *acc_weight,
                           int64_t pos) {
    if (acc_weight) {
        const float wv = acc_weight[pos];
        for (int64_t o = 0; o < O; ++o) {
            const float product = (relu && !(acc[o] > 0.0f) ? 0.0f : acc[o]) * wv;
            dst[o * OHW] = product + dst[o * OHW];
        }
    } else {
        for (int64_t o = 0; o < O; ++o) dst[o * OHW] = relu && !(acc[o] > 0.0f) ? 0.0f : acc[o];
    }
}

/* out[n][o][p] (zeroed by the caller) = conv(x)[n][o][p] (+ ReLU) at the flattened positions
 * n*OH*OW + p; x [N][C][H][W], w [C][KH][KW][O].  acc_weight (nullable, [N][OH*OW]): add instead,
 * out = conv * acc_weight + out (a sparse-assisted pair's masked sum). */
BZ_EXPORT int bz_sparse_fconv(const float *x, int64_t N, int64_t C, int64_t H, int64_t W, const float *w,
                              const float *bias, int64_t O, int64_t KH, int64_t KW, int64_t PH, int64_t PW,
                              int64_t DH, int64_t DW, int64_t OH, int64_t OW, int relu, const int64_t *positions,
                              int64_t npos, const float *acc_weight, float *out, int nthreads) {
    if (N < 1 || C < 1 || O < 1 || O > 4096 || KH < 1 || KW < 1 || OH < 1 || OW < 1) return -1;
    const int parallel = nthreads > 1 && (double)npos * (double)(C * KH * KW * O) >= BZ_CONV_PARALLEL_MIN;
    (void)parallel;
#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
    const int quad = fma_available();
#else
    const int quad = 0;
#endif
    int status = 0;
#pragma omp parallel num_threads(clamp_threads(nthreads)) if (parallel)
    {
        float *acc = (float *)malloc(sizeof(float) * (size_t)O);
        if (!acc) {
#pragma omp atomic write
            status = -2;
        } else {
            int64_t q;
#pragma omp for schedule(static)
            for (q = 0; q < (npos + 3) / 4; ++q) {
                const int64_t i0 = 4 * q, i1 = (i0 + 4) < npos ? (i0 + 4) : npos;
                int64_t n4[4], pix4[4];
                int inside = i1 - i0 == 4 && quad && O <= 16 && O % 8 == 0;
                for (int64_t i = i0; i < i1; ++i) {
                    const int64_t pos = positions[i], n = pos / (OH * OW), pixel = pos % (OH * OW);
                    const int64_t ih0 = pixel / OW - PH, iw0 = pixel % OW - PW;
                    n4[i - i0] = n;
                    pix4[i - i0] = pixel;
                    inside = inside && n >= 0 && n < N && ih0 >= 0 && ih0 + (KH - 1) * DH < H && iw0 >= 0 &&
                             iw0 + (KW - 1) * DW < W;
                }
#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
                if (inside) {
                    const float *src[4];
                    float acc4[4][16];
                    for (int i = 0; i < 4; ++i)
                        src[i] = x + n4[i] * C * H * W + (pix4[i] / OW - PH) * W + (pix4[i] % OW - PW);
                    sparse_fconv_quad(src, H * W, C, w, bias, (int)(O / 8), KH, KW, DH * W, DW, acc4);
                    for (int i = 0; i < 4; ++i)
                        fconv_store(out + n4[i] * O * OH * OW + pix4[i], OH * OW, acc4[i], O, relu, acc_weight,
                                    n4[i] * OH * OW + pix4[i]);
                    continue;
                }
#endif
                for (int64_t i = i0; i < i1; ++i) {
                    const int64_t n = n4[i - i0], pixel = pix4[i - i0];
                    if (n < 0 || n >= N) continue;
                    sparse_fconv_point(x + n * C * H * W, C, H, W, w, bias, O, KH, KW, PH, PW, DH, DW, pixel / OW,
                                       pixel % OW, acc);
                    fconv_store(out + n * O * OH * OW + pixel, OH * OW, acc, O, relu, acc_weight, n * OH * OW + pixel);
                }
            }
            free(acc);
        }
    }
    return status;
}

/* ------------------------------------------------------------------------------------------ */
/* Guided filter's full-resolution step: up-sample the coefficients and apply them in one pass   */
/* ------------------------------------------------------------------------------------------ */

/* Source indices and weights of PyTorch's bilinear resize (align_corners=False, output size given)
 * along one axis, in its float arithmetic (ATen UpSample.h: area_pixel_compute_source_index,
 * guard_index_and_lambda), so the resized values are bit-identical to F.interpolate's. */
static void linear_resize_table(int64_t in, int64_t out, int64_t *i0, int64_t *i1, float *l0, float *l1) {
    const float ratio = (float)in / (float)out;
    for (int64_t o = 0; o < out; ++o) {
        if (in == out) { i0[o] = i1[o] = o; l0[o] = 1.0f; l1[o] = 0.0f; continue; }
        float real = ratio * ((float)o + 0.5f) - 0.5f;
        if (real < 0.0f) real = 0.0f;
        int64_t index = (int64_t)floorf(real);
        if (index > in - 1) index = in - 1;
        float lambda = real - (float)index;
        lambda = lambda < 0.0f ? 0.0f : (lambda > 1.0f ? 1.0f : lambda);
        i0[o] = index;
        i1[o] = index + (index < in - 1 ? 1 : 0);
        l1[o] = lambda;
        l0[o] = 1.0f - lambda;
    }
}

/* one low-resolution row resized along the width: dst[x] = row[i0[x]] * l0[x] + row[i1[x]] * l1[x] */
BZ_CLONES static void resize_row(const float *restrict row, const int64_t *i0, const int64_t *i1, const float *l0,
                                 const float *l1, float *restrict dst, int64_t W) {
    for (int64_t x = 0; x < W; ++x) {
        const float a = row[i0[x]] * l0[x];
        const float b = row[i1[x]] * l1[x];
        dst[x] = a + b;
    }
}

/* out = (t0 * lh0 + t1 * lh1) * guide + (u0 * lh0 + u1 * lh1) over a row: the slope and offset rows
 * resized along the height, times the guide, plus the offset (each operation rounded as in torch) */
BZ_CLONES static void guided_row(const float *restrict t0, const float *restrict t1, const float *restrict u0,
                                 const float *restrict u1, float lh0, float lh1, const float *restrict guide,
                                 float *restrict out, int64_t W) {
    for (int64_t x = 0; x < W; ++x) {
        const float s0 = t0[x] * lh0, s1 = t1[x] * lh1;
        const float o0 = u0[x] * lh0, o1 = u1[x] * lh1;
        const float slope = s0 + s1, offset = o0 + o1;
        const float product = slope * guide[x];
        out[x] = product + offset;
    }
}

/* out [N][C][H][W] = resize(slope) * guide + resize(offset): slope, offset [N][C][h][w] resized
 * bilinearly to H x W as F.interpolate(..., mode="bilinear", align_corners=False) does; the guide's
 * channel c < C - 1 is src[n][c] ([N][C-1][H][W]) and channel C - 1 is last[n] ([N][1][H][W]).
 * The Deep Guided Filter's full-resolution step without the resized maps or the concatenated guide. */
BZ_EXPORT int bz_guided_apply(const float *slope, const float *offset, int64_t N, int64_t C, int64_t h, int64_t w,
                              const float *src, const float *last, int64_t H, int64_t W, float *out, int nthreads) {
    if (N < 1 || C < 1 || h < 1 || w < 1 || H < 1 || W < 1) return -1;
    int64_t *xi = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * W + 2 * H));
    float *xl = (float *)malloc(sizeof(float) * (size_t)(2 * W + 2 * H));
    if (!xi || !xl) { free(xi); free(xl); return -2; }
    int64_t *xi0 = xi, *xi1 = xi + W, *yi0 = xi + 2 * W, *yi1 = yi0 + H;
    float *xl0 = xl, *xl1 = xl + W, *yl0 = xl + 2 * W, *yl1 = yl0 + H;
    linear_resize_table(w, W, xi0, xi1, xl0, xl1);
    linear_resize_table(h, H, yi0, yi1, yl0, yl1);
    const int parallel = nthreads > 1 && N * C * H * W >= BZ_PACK_PARALLEL_MIN;
    (void)parallel;
    int status = 0;
#pragma omp parallel num_threads(clamp_threads(nthreads)) if (parallel)
    {
        /* width-resized rows of the 2C maps for two source rows, reused by the output rows that
         * read them (each source row serves about H / h consecutive output rows) */
        float *rows = (float *)malloc(sizeof(float) * (size_t)(2 * 2 * C * W));
        int64_t held[2] = {-1, -1}; /* n * h + source row held by each slot */
        if (!rows) {
#pragma omp atomic write
            status = -2;
        } else {
            int64_t job;
#pragma omp for schedule(static)
            for (job = 0; job < N * H; ++job) {
                const int64_t n = job / H, y = job % H;
                const int64_t want[2] = {n * h + yi0[y], n * h + yi1[y]};
                float *slot[2];
                for (int k = 0; k < 2; ++k) {
                    int found = held[0] == want[k] ? 0 : (held[1] == want[k] ? 1 : -1);
                    if (found < 0) { /* fill the slot that does not hold the other wanted row */
                        found = held[0] == want[1 - k] ? 1 : 0;
                        const int64_t r = want[k] - n * h;
                        for (int64_t c = 0; c < C; ++c) {
                            float *dst = rows + (size_t)found * 2 * C * W + 2 * c * W;
                            resize_row(slope + ((n * C + c) * h + r) * w, xi0, xi1, xl0, xl1, dst, W);
                            resize_row(offset + ((n * C + c) * h + r) * w, xi0, xi1, xl0, xl1, dst + W, W);
                        }
                        held[found] = want[k];
                    }
                    slot[k] = rows + (size_t)found * 2 * C * W;
                }
                for (int64_t c = 0; c < C; ++c) {
                    const float *guide = c < C - 1 ? src + ((n * (C - 1) + c) * H + y) * W : last + (n * H + y) * W;
                    guided_row(slot[0] + 2 * c * W, slot[1] + 2 * c * W, slot[0] + 2 * c * W + W,
                               slot[1] + 2 * c * W + W, yl0[y], yl1[y], guide, out + ((n * C + c) * H + y) * W, W);
                }
            }
            free(rows);
        }
    }
    free(xi);
    free(xl);
    return status;
}

/* out[n][c][p] = vals[c][k] * weights[k] + out[n][c][p] at the K positions n*P + p (each listed
 * once): the masked sum of a sparse-assisted pair, with the float model's rounding (product, then sum).
 * Positions are split into (sample, pixel) once, not once per channel (64-bit divisions are slow). */
BZ_EXPORT int bz_masked_add(float *out, int64_t N, int64_t C, int64_t P, const float *vals, const float *weights,
                            const int64_t *positions, int64_t K, int nthreads) {
    if (N < 1 || C < 1 || P < 1 || K < 0) return -1;
    int64_t *offset = (int64_t *)malloc(sizeof(int64_t) * (size_t)(K + 1));
    if (!offset) return -2;
    for (int64_t k = 0; k < K; ++k) {
        const int64_t pos = positions[k];
        const int64_t n = pos / P;
        offset[k] = (n < 0 || n >= N) ? -1 : n * C * P + pos % P; /* element (n, 0, p) */
    }
    /* channels write disjoint planes: split them over the threads */
    const int parallel = nthreads > 1 && C > 1 && C * K >= BZ_PACK_PARALLEL_MIN;
    (void)parallel;
    int64_t c;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(nthreads)) if (parallel)
    for (c = 0; c < C; ++c) {
        const float *v = vals + c * K;
        float *plane = out + c * P;
        for (int64_t k = 0; k < K; ++k) {
            if (offset[k] < 0) continue;
            float *dst = plane + offset[k];
            const float product = v[k] * weights[k];
            *dst = product + *dst;
        }
    }
    free(offset);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Python module stub: the library is used through ctypes, but stays importable as a module.  */
/* ------------------------------------------------------------------------------------------ */
#ifdef BZ_PYTHON_MODULE
static struct PyModuleDef bz_module = {PyModuleDef_HEAD_INIT, "_bitconv",
                                       "binarize packed XNOR-popcount kernels (used via ctypes)", -1,
                                       NULL};
PyMODINIT_FUNC PyInit__bitconv(void) { return PyModule_Create(&bz_module); }
#endif
