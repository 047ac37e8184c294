#include "backend/cpu_setup.h"

#include <sched.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "base/log.h"

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

int sy_cpu_count(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* ---- OpenBLAS and memory limits --------------------------------------------------------------
 * OpenBLAS takes a buffer of SY_BLAS_BUFFER_BYTES per thread (its constructor takes one for each
 * of the threads it starts with; openblas_set_num_threads takes those of new threads), and when
 * the allocation fails it retries for ever (blas_memory_alloc: issue 16 #6, a worker under
 * `ulimit -v` spun for 12 minutes). So the address space is probed first, with a mapping of
 * that size that is never touched (it counts against RLIMIT_AS and strict overcommit, costs no
 * memory), and a shortfall is an error with a message instead. */
#define SY_BLAS_BUFFER_BYTES ((size_t)129 << 20) /* BUFFER_SIZE 128 MiB + its alignment page */
#define SY_THREAD_STACK_BYTES ((size_t)8 << 20)

static bool address_space_for(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    munmap(p, bytes);
    return true;
}

size_t sy_cpu_blas_bytes(int threads) {
    if (threads < 1) return 0;
    return (size_t)threads * SY_BLAS_BUFFER_BYTES + (size_t)(threads - 1) * SY_THREAD_STACK_BYTES;
}

bool sy_cpu_blas_room(int threads) { return threads < 1 || address_space_for(sy_cpu_blas_bytes(threads)); }

/* Runs from .preinit_array: before any library constructor (OpenBLAS's included), so only raw
 * system calls, no stdio, no getenv (libc's environ is not set yet: envp is). */
static int env_int(char **envp, const char *name) {
    size_t n = strlen(name);
    for (char **e = envp; e && *e; e++)
        if (!strncmp(*e, name, n) && (*e)[n] == '=') return atoi(*e + n + 1);
    return 0;
}

static void put(const char *s) {
    ssize_t r = write(2, s, strlen(s));
    (void)r;
}

static void put_num(size_t v) {
    char b[24];
    int i = (int)sizeof b - 1;
    b[i] = 0;
    do b[--i] = (char)('0' + v % 10); while ((v /= 10) && i > 0);
    put(b + i);
}

static void preinit_blas_check(int argc, char **argv, char **envp) {
    (void)argc;
    int n = env_int(envp, "OPENBLAS_NUM_THREADS");
    if (n < 1) n = env_int(envp, "GOTO_NUM_THREADS");
    if (n < 1) n = env_int(envp, "OMP_NUM_THREADS");
    if (n < 1) n = sy_cpu_count();
    if (n > 512) n = 512;
    if (sy_cpu_blas_room(n)) return;
    put(argv && argv[0] ? argv[0] : "switchyard");
    put(": error: no address space for OpenBLAS's buffers: it starts ");
    put_num((size_t)n);
    put(" thread(s) and needs about ");
    put_num(sy_cpu_blas_bytes(n) >> 20);
    put(" MiB for them before anything else runs (and would retry the allocation for ever). Raise the "
        "limit (ulimit -v) or start fewer threads (OPENBLAS_NUM_THREADS=1).\n");
    _exit(1);
}

__attribute__((section(".preinit_array"), used)) static void (*const sy_preinit)(int, char **, char **) =
    preinit_blas_check;
