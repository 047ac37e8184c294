#include "cpu_setup.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

char *openblas_get_corename(void);

/* libgomp spins this many times waiting at a barrier before it sleeps (its default, 300000, is
 * about a millisecond). The models run hundreds of short parallel regions a step; when another
 * process holds a core, a thread spinning for one that is descheduled burns the time the other
 * needs: the tiny step took 3x as long as with passive waits (docs/performance.md). A short spin
 * keeps the quiet-machine latency and sleeps soon under contention. */
#define SY_GOMP_SPINCOUNT "10000"

void sy_cpu_setup(int argc, char **argv) {
    (void)argc;
    if (getenv("SY_NO_REEXEC")) return;
    bool change = false;
    if (!getenv("OMP_WAIT_POLICY") && !getenv("GOMP_SPINCOUNT")) {
        if (setenv("GOMP_SPINCOUNT", SY_GOMP_SPINCOUNT, 1) != 0) return;
        change = true;
    }
    __builtin_cpu_init();
    if (!getenv("OPENBLAS_CORETYPE") && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl")) {
        if (setenv("OPENBLAS_CORETYPE", "SkylakeX", 1) != 0) return;
        change = true;
    }
    if (!change) return;
    execv("/proc/self/exe", argv);
    /* exec failed: carry on with the default kernels and wait policy. */
    sy_warn("could not re-execute to select OpenBLAS kernels and the OpenMP wait policy; "
            "continuing with %s", sy_cpu_blas_core());
}

const char *sy_cpu_blas_core(void) {
    const char *c = openblas_get_corename();
    return c ? c : "unknown";
}
