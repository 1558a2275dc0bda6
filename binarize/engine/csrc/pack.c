/* Bit packing of float activations (fused bias-add + sign + pack), also straight from the parts of a
 * concatenation and from a 2x up-sampled map (the decoder's "up-sample, concatenate, pack"). */
#include "bitconv.h"

/* one 64-channel word for np <= PACK_PIXELS pixels, channel c read from rows[c][i * sp]: 32-bit
 * halves so the compare vectorises per lane */
BZ_CLONES void pack_rows(const float *const *rows, int64_t sp, int64_t nc, int64_t np, const float *bias,
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
void pack_block(const float *x, int64_t sc, int64_t sp, int64_t nc, int64_t np, const float *bias, u64 *dst,
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
