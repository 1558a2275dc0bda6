/* CPU features, kernel selection and the library's version: which kernel family runs here. */
#ifdef BZ_PYTHON_MODULE
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first, as Python requires */
#endif
#include "bitconv.h"

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

/* the automatic choice: the table kernel wherever AVX2 runs, AVX-512 CPUs included (on an AMD EPYC
 * Zen 4 with AVX-512 VPOPCNTDQ, one thread, the 22 BiMatting 3x3 shapes with packed input took 13.5 ms
 * with avx2_nibble against 40.9 ms with avx512, and a 512x288 frame on two threads 143 against 156 ms,
 * median of 24 frames each in alternating blocks, a loaded machine); avx512 runs when forced */
int best_kernel(void) {
    if (g_forced_kernel != BZ_KERNEL_AUTO && cpu_has(g_forced_kernel)) return g_forced_kernel;
    if (cpu_has(BZ_KERNEL_AVX2)) return BZ_KERNEL_AVX2_NIBBLE;
    if (cpu_has(BZ_KERNEL_AVX512)) return BZ_KERNEL_AVX512;
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

#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
int fma_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

/* ------------------------------------------------------------------------------------------ */
/* Python module stub: the library is used through ctypes, but stays importable as a module.  */
/* ------------------------------------------------------------------------------------------ */
#ifdef BZ_PYTHON_MODULE
static struct PyModuleDef bz_module = {PyModuleDef_HEAD_INIT, "_bitconv",
                                       "binarize packed XNOR-popcount kernels (used via ctypes)", -1,
                                       NULL};
PyMODINIT_FUNC PyInit__bitconv(void) { return PyModule_Create(&bz_module); }
#endif
