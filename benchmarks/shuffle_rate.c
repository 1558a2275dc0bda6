/*
 * The ceiling of the table look-up kernel on this CPU: how many VPSHUFB + VPADDB pairs (one pair
 * counts 4 channels x 32 pixels = 128 bit products) and how many FMAs (8 fp32 multiply-adds each)
 * one core retires per cycle, measured with register-only loops so that nothing but the execution
 * units limits them.  Their ratio bounds what a binary layer can gain over an fp32 one on this core
 * before any memory traffic (docs/performance.md, "What limits a layer").
 *
 *   gcc -O2 -o /tmp/shuffle_rate benchmarks/shuffle_rate.c && /tmp/shuffle_rate
 *
 * x86-64 with AVX2 and FMA, GCC or Clang (AT&T inline assembly).  The clock is measured with a chain
 * of dependent integer adds (one per cycle), so the rates are per cycle of the running clock.
 */
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* 4 dependent adds per iteration: one cycle each */
__attribute__((noinline)) static void clock_loop(long n) {
    long x = 0;
    for (long i = 0; i < n; ++i) __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
}

#define PAIR(t, x, acc, tmp) "vpshufb %%ymm" #x ", %%ymm" #t ", %%ymm" #tmp "\n\tvpaddb %%ymm" #tmp ", %%ymm" #acc ", %%ymm" #acc "\n\t"

/* 8 independent look-up + accumulate pairs per iteration, tables and indices in registers */
__attribute__((noinline)) static void pairs_in_registers(long n) {
    __asm__ volatile("vpxor %%ymm0, %%ymm0, %%ymm0\n\tvpxor %%ymm1, %%ymm1, %%ymm1\n\t"
                     "vpxor %%ymm10, %%ymm10, %%ymm10\n\tvpxor %%ymm11, %%ymm11, %%ymm11\n"
                     "1:\n\t"
                     PAIR(10, 0, 2, 15) PAIR(10, 1, 3, 14) PAIR(11, 0, 4, 13) PAIR(11, 1, 5, 12)
                     PAIR(10, 0, 6, 15) PAIR(10, 1, 7, 14) PAIR(11, 0, 8, 13) PAIR(11, 1, 9, 12)
                     "dec %0\n\tjnz 1b\n"
                     : "+r"(n)
                     :
                     : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
                       "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc");
}

/* the kernel's inner step (engine/csrc/table.c, nibble_counts): 2 index vectors loaded, 4 tables
 * broadcast from memory, 8 pairs; everything in L1 */
__attribute__((noinline)) static void kernel_step(long n, const unsigned char *data) {
    __asm__ volatile("1:\n\t"
                     "vmovdqu (%1), %%ymm0\n\tvmovdqu 32(%1), %%ymm1\n\t"
                     "vbroadcasti128 64(%1), %%ymm10\n\t" PAIR(10, 0, 2, 15) PAIR(10, 1, 3, 14)
                     "vbroadcasti128 80(%1), %%ymm11\n\t" PAIR(11, 0, 4, 13) PAIR(11, 1, 5, 12)
                     "vbroadcasti128 96(%1), %%ymm10\n\t" PAIR(10, 0, 6, 15) PAIR(10, 1, 7, 14)
                     "vbroadcasti128 112(%1), %%ymm11\n\t" PAIR(11, 0, 8, 13) PAIR(11, 1, 9, 12)
                     "dec %0\n\tjnz 1b\n"
                     : "+r"(n)
                     : "r"(data)
                     : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
                       "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
}

#define FMA(acc) "vfmadd231ps %%ymm14, %%ymm15, %%ymm" #acc "\n\t"

/* 10 independent FMA chains (enough to cover the FMA latency on 2 pipes) */
__attribute__((noinline)) static void fmas_in_registers(long n) {
    __asm__ volatile("vxorps %%ymm14, %%ymm14, %%ymm14\n\tvxorps %%ymm15, %%ymm15, %%ymm15\n"
                     "1:\n\t"
                     FMA(0) FMA(1) FMA(2) FMA(3) FMA(4) FMA(5) FMA(6) FMA(7) FMA(8) FMA(9)
                     "dec %0\n\tjnz 1b\n"
                     : "+r"(n)
                     :
                     : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm14",
                       "xmm15", "cc");
}

/* operations per second of fn(iterations) doing ops_per_iteration each; best of 3 */
static double rate(void (*fn)(long), long iterations, double ops_per_iteration) {
    double best = 0.0;
    for (int round = 0; round < 3; ++round) {
        const double start = now();
        fn(iterations);
        const double r = (double)iterations * ops_per_iteration / (now() - start);
        if (r > best) best = r;
    }
    return best;
}

static const unsigned char *step_data;
static void kernel_step_bound(long n) { kernel_step(n, step_data); }

int main(void) {
    static unsigned char data[256] __attribute__((aligned(64)));
    step_data = data;
    const long n = 50000000;
    const double clock = rate(clock_loop, n, 4.0);
    const double pairs = rate(pairs_in_registers, n, 8.0) / clock;
    const double step = rate(kernel_step_bound, n, 8.0) / clock;
    const double fmas = rate(fmas_in_registers, n, 10.0) / clock;
    printf("clock                       %.2f GHz\n", clock * 1e-9);
    printf("VPSHUFB+VPADDB pairs/cycle  %.2f in registers, %.2f as the kernel's step "
           "(%.0f / %.0f bit products per cycle)\n", pairs, step, pairs * 128, step * 128);
    printf("FMA (8 x fp32) per cycle    %.2f (%.1f multiply-adds per cycle)\n", fmas, fmas * 8);
    printf("ceiling of a binary layer over an fp32 layer running at FMA peak: %.1fx (kernel step: %.1fx)\n",
           pairs * 128 / (fmas * 8), step * 128 / (fmas * 8));
    return 0;
}
