/*
 * binarize packed engine: bit packing and XNOR-popcount convolution on raw buffers.
 * This internal header is shared by the library's source files, one kernel family per file:
 *
 *   dispatch.c    CPU features, kernel selection, version, the Python module stub
 *   pack.c        bit packing of float maps (also of a concatenation / an up-sampled map)
 *   conv.c        the binary convolution driver bz_conv: im2col, tiles, threads, border corrections
 *   popcount.c    XNOR-popcount GEMM micro-kernels (portable, POPCNT, AVX2, hybrid, AVX-512)
 *   planes.c      the table kernel's input planes (one byte per pixel and 4 channels)
 *   table.c       the table look-up kernel (VPSHUFB over the planes)
 *   epilogue.c    the fused epilogue, op chains, exp / sigmoid / tanh, channel mix, GRU update
 *   resample.c    2x2 average pooling, 2x bilinear up-sampling, the guided filter's last step
 *   sparse.c      sparse float conv at listed positions, masked scatter-add
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
 * The library is loaded with ctypes; the BZ_EXPORT functions are its whole interface.
 */
#ifndef BZ_BITCONV_H
#define BZ_BITCONV_H

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

static inline int clamp_threads(int n) { return n < 1 ? 1 : n; }

/* GCC/clang on x86 Linux: compile hot loops twice (AVX2 and baseline) and pick at load time */
#if defined(BZ_X86) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(BZ_NO_CLONES)
#define BZ_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define BZ_CLONES
#endif

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

/* popcounts of up to PB_MAX pixels x OB outputs: P[j*ldp + i] = popcount(A[i] XOR W[:, j]) */
typedef void (*microkernel_fn)(const u64 *, int64_t, int, const u64 *, int64_t, int32_t *, int64_t);

/* all np pixels of a tile at once, for LW == 1 (NULL: use the micro-kernel) */
typedef void (*word_kernel_fn)(const u64 *, int64_t, int, const u64 *, int32_t *, int64_t);

/* 8-lane float / int vectors (GCC / clang vector extensions) for the epilogue's loops */
#if defined(__GNUC__)
typedef float bz_v8f __attribute__((vector_size(32), aligned(4)));
typedef int32_t bz_v8i __attribute__((vector_size(32), aligned(4)));
#endif

/* ---- functions shared between the files (hidden: not part of the library's interface) ---- */
#if defined(__GNUC__) && !defined(_MSC_VER)
#define BZ_INTERNAL __attribute__((visibility("hidden")))
#else
#define BZ_INTERNAL
#endif

/* dispatch.c */
BZ_INTERNAL int best_kernel(void); /* the kernel that runs: the forced one if the CPU has it, else the best */
#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
BZ_INTERNAL int fma_available(void);
#endif

/* pack.c */
BZ_INTERNAL void pack_rows(const float *const *rows, int64_t sp, int64_t nc, int64_t np, const float *bias, u64 *dst,
               int64_t dst_stride);
BZ_INTERNAL void pack_block(const float *x, int64_t sc, int64_t sp, int64_t nc, int64_t np, const float *bias, u64 *dst,
                int64_t dst_stride);
BZ_EXPORT void bz_pack(const float *x, int64_t N, int64_t C, int64_t P, int64_t sn, int64_t sc, int64_t sp,
                       const float *bias, int64_t G, u64 *out, int nthreads);

/* popcount.c */
BZ_INTERNAL microkernel_fn select_microkernel(int kernel);
BZ_INTERNAL word_kernel_fn select_word_kernel(int kernel, int64_t LW);

/* planes.c */
BZ_INTERNAL int nibble_setup(conv_args *a, const uint8_t *tables, int shared_tables);
BZ_INTERNAL void nibble_plane_row(const conv_args *a, int64_t n, int64_t r);

/* table.c */
BZ_INTERNAL void table_tile(const conv_args *a, int64_t n, int64_t p0, int np, tile_buffers *buf);
BZ_INTERNAL void nibble_tile_counts(const conv_args *a, const tile_buffers *buf, int64_t ob, int32_t *P);

/* epilogue.c */
BZ_INTERNAL int chain_kind(const conv_args *a);
BZ_INTERNAL void epilogue_row(const conv_args *a, int64_t oc, const int32_t *popc, const int32_t *base, int np, float *y,
                  const float *res);
BZ_INTERNAL void mix_tile(const conv_args *a, const float *y, int np, float *out, int64_t ld_out);

/* resample.c */
BZ_INTERNAL void upsample_source_rows(int64_t oh, int64_t H, int64_t *h0, int64_t *h1, float *lh0, float *lh1);
BZ_INTERNAL void upsample_row(const float *r0, const float *r1, float lh0, float lh1, float *dst, int64_t W);

#endif /* BZ_BITCONV_H */
