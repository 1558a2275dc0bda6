/* The binary convolution driver (bz_conv): packed im2col, tiles over threads, dispatch of each tile
 * to the popcount or table kernel, border corrections, then the epilogue. */
#include "bitconv.h"

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
