/* Picks the right OpenBLAS kernels and OpenMP wait policy before either initialises.
 *
 * Debian's OpenBLAS 0.3.21 (DYNAMIC_ARCH) misdetects some AVX-512 CPUs and falls back to SSE3
 * "Prescott" kernels, about 10x slower. OpenBLAS reads OPENBLAS_CORETYPE once, in its library
 * constructor, which runs before main(), and libgomp reads GOMP_SPINCOUNT the same way; so the
 * only reliable fix from inside the program is to set the variables and re-execute.
 * sy_cpu_setup() does that once: OPENBLAS_CORETYPE=SkylakeX only when the CPU reports AVX-512
 * F/BW/DQ/VL (what the SkylakeX kernels use) and the variable is unset (CPUs without AVX-512
 * keep OpenBLAS's own detection; a machine that sets it keeps its value); GOMP_SPINCOUNT (short
 * spin-waits, see cpu_setup.c) only when neither it nor OMP_WAIT_POLICY is set. Neither choice
 * changes a result. SY_NO_REEXEC=1 disables it. */
#ifndef SY_CPU_SETUP_H
#define SY_CPU_SETUP_H

#include <stdbool.h>
#include <stddef.h>

/* Call first thing in main(). Returns only if no re-exec was needed or it failed. */
void sy_cpu_setup(int argc, char **argv);

/* The kernel set OpenBLAS reports (openblas_get_corename), for logs and benchmarks. */
const char *sy_cpu_blas_core(void);

/* CPUs this process may run on (its affinity mask, what `nproc` prints); at least 1. Thread
 * counts (--threads, train.threads) are capped at this: more threads than cores only costs
 * memory (OpenBLAS allocates buffers per thread) and time. */
int sy_cpu_count(void);

/* Address space OpenBLAS takes for `threads` threads (a 129 MiB buffer each, plus stacks), and
 * whether that much can be mapped now. OpenBLAS retries a failed buffer allocation for ever,
 * so callers check before raising its thread count. Linking this module into a program also
 * checks, before any library constructor runs, that OpenBLAS's own start-up buffers fit, and
 * otherwise exits 1 with a message instead of spinning. */
size_t sy_cpu_blas_bytes(int threads);
bool sy_cpu_blas_room(int threads);

#endif
