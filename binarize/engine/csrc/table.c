/* The table look-up kernel (avx2_nibble): VPSHUFB over the nibble planes counts 4 channels of 32
 * pixels per instruction, for dense ungrouped k x k convolutions. */
#include "bitconv.h"

#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))

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


#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
/* popcounts of output block ob (OB == 8 channels) over the tile's vectors (table_tile), by
 * table look-up: two vectors at a time (4 outputs at a time), an odd last one alone (8 outputs) */
void nibble_tile_counts(const conv_args *a, const tile_buffers *buf, int64_t ob, int32_t *P) {
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
void nibble_tile_counts(const conv_args *a, const tile_buffers *buf, int64_t ob, int32_t *P) {
    (void)a; (void)buf; (void)ob; (void)P; /* never called: the planes need AVX2 */
}
#endif

/* the table kernel's view of tile pixels p0.. (np of them) of image n, one output row segment at a
 * time: the epilogue base (valid taps x channels) of each pixel, and the vectors of up to 32
 * neighbouring outputs of one row with the planes' address of each vector's first output (listed
 * once per tile, shared by its output blocks; locals: the stores could alias the fields) */
BZ_CLONES void table_tile(const conv_args *a, int64_t n, int64_t p0, int np, tile_buffers *buf) {
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
