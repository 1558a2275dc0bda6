/* The nibble planes, the table kernel's input: one byte per (pixel, 4 channels), padded, built from
 * floats or from packed words; and the per-call set-up of the table kernel (nibble_setup). */
#include "bitconv.h"

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
void nibble_plane_row(const conv_args *a, int64_t n, int64_t r) {
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

/* use the tables (and allocate their planes) when the call and the CPU allow it: dense, ungrouped,
 * the AVX2 table kernel selected, and counts that fit 16 bits.  Returns -2 when out of memory. */
int nibble_setup(conv_args *a, const uint8_t *tables, int shared_tables) {
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
