/* The CUDA backend's entry points (backend.h sy_backend_cuda_*): they load the CUDA backend
 * module, libsy_backend_cuda.so (cuda_module_internal.h says why it is a module), on first use
 * and call into it. A CPU process never loads it.
 *
 * Where the module is looked for, first found wins: $SY_CUDA_MODULE (a path); beside the
 * executable; one folder up (tests and benchmarks live in build/tests, build/bench); in
 * ../lib/switchyard/ from the executable (`cmake --install`); the build folder it was built
 * in. Failures are clear errors, never a hang: a build without CUDA says so; a module that
 * cannot be loaded names the file and the loader's reason (typically the CUDA runtime or cuBLAS
 * libraries missing). */
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/backend.h"
#include "base/log.h"
#include "base/rng.h"
#include "cuda_module_internal.h"

#define SY_NO_CUDA_MSG                                                                     \
    "this switchyard was built without CUDA (no nvcc found when CMake configured it, or "  \
    "-DSY_CUDA=OFF): rebuild on a machine with the CUDA toolkit (nvcc on PATH or "          \
    "/usr/local/cuda) to use cluster.backend: cuda"

#ifdef SY_HAVE_CUDA

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static const sy_cuda_module_api *g_mod;
static char g_load_err[1024];
static sy_cuda_host_api g_host;

static void host_log(int level, const char *msg) {
    SY_LOG((sy_log_level)(level < 0 ? 0 : level > 3 ? 3 : level), "%s", msg);
}

/* dlopen one candidate; true when it loaded and its table is this host's ABI */
static bool try_load(const char *path, char *tried, size_t tried_len) {
    if (access(path, F_OK) != 0) return false;
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(g_load_err, sizeof g_load_err, "cannot load the CUDA backend module %.400s: %.400s (are the CUDA "
                 "runtime and cuBLAS libraries installed and on the library path?)", path, dlerror());
        return false;
    }
    sy_cuda_module_fn fn = (sy_cuda_module_fn)dlsym(h, SY_CUDA_MODULE_SYMBOL);
    const sy_cuda_module_api *m = fn ? fn() : NULL;
    if (!m || m->abi != SY_CUDA_MODULE_ABI) {
        snprintf(g_load_err, sizeof g_load_err, "%.400s is not a CUDA backend module of this build (ABI %d, want %d)",
                 path, m ? m->abi : -1, SY_CUDA_MODULE_ABI);
        dlclose(h);
        return false;
    }
    (void)tried, (void)tried_len;
    g_mod = m; /* kept loaded for the process's life */
    return true;
}

static void load_once(void) {
    g_host.abi = SY_CUDA_MODULE_ABI;
    g_host.log = host_log;
    g_host.tag_jitter = sy_fnv1a64("router.jitter");
    g_host.tag_dropout = sy_fnv1a64("expert.dropout");
    char cand[5][PATH_MAX + 64];
    int nc = 0;
    const char *env = getenv("SY_CUDA_MODULE");
    if (env && env[0]) snprintf(cand[nc++], sizeof cand[0], "%s", env);
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = 0;
            snprintf(cand[nc++], sizeof cand[0], "%s/%s", exe, SY_CUDA_MODULE_FILE);
            snprintf(cand[nc++], sizeof cand[0], "%s/../%s", exe, SY_CUDA_MODULE_FILE);
            snprintf(cand[nc++], sizeof cand[0], "%s/../lib/switchyard/%s", exe, SY_CUDA_MODULE_FILE);
        }
    }
    snprintf(cand[nc++], sizeof cand[0], "%s", SY_CUDA_MODULE_BUILD_PATH);
    g_load_err[0] = 0;
    for (int i = 0; i < nc; i++)
        if (try_load(cand[i], NULL, 0)) return;
    if (!g_load_err[0])
        snprintf(g_load_err, sizeof g_load_err, "the CUDA backend module %s was not found (looked beside the "
                 "executable, in ../lib/switchyard/, in %s; SY_CUDA_MODULE=PATH names it)",
                 SY_CUDA_MODULE_FILE, SY_CUDA_MODULE_BUILD_PATH);
}

static const sy_cuda_module_api *module(void) {
    pthread_once(&g_once, load_once);
    return g_mod;
}

bool sy_backend_cuda_built(void) { return true; }

int sy_backend_cuda_devices(char *why, size_t why_len) {
    const sy_cuda_module_api *m = module();
    if (!m) {
        if (why && why_len) snprintf(why, why_len, "%s", g_load_err);
        return -1;
    }
    return m->devices(why, why_len);
}

sy_status sy_backend_cuda_new(int device, bool bf16, sy_backend_t **out) {
    *out = NULL;
    const sy_cuda_module_api *m = module();
    if (!m) return sy_err_set(SY_ENOTFOUND, "cuda backend (device %d): %s", device, g_load_err);
    char err[1024] = "";
    int st = m->backend_new(&g_host, device, bf16, out, err, sizeof err);
    if (st != SY_OK) {
        *out = NULL;
        return sy_err_set((sy_status)st, "%s", err[0] ? err : "cuda backend: creation failed");
    }
    return SY_OK;
}

double sy_backend_cuda_gemm_tflops(int device, int M, int N, int K, int iters) {
    const sy_cuda_module_api *m = module();
    if (!m) {
        sy_err_set(SY_ENOTFOUND, "cuda backend (device %d): %s", device, g_load_err);
        return -1.0;
    }
    char err[1024] = "";
    double r = m->gemm_tflops(&g_host, device, M, N, K, iters, err, sizeof err);
    if (r < 0) sy_err_set(SY_ENOTFOUND, "%s", err[0] ? err : "cuda backend: gemm rate failed");
    return r;
}

#else /* a build without CUDA */

bool sy_backend_cuda_built(void) { return false; }

int sy_backend_cuda_devices(char *why, size_t why_len) {
    if (why && why_len) snprintf(why, why_len, "%s", SY_NO_CUDA_MSG);
    return -1;
}

sy_status sy_backend_cuda_new(int device, bool bf16, sy_backend_t **out) {
    (void)bf16;
    *out = NULL;
    return sy_err_set(SY_EINVAL, "cuda backend (device %d): %s", device, SY_NO_CUDA_MSG);
}

double sy_backend_cuda_gemm_tflops(int device, int M, int N, int K, int iters) {
    (void)M, (void)N, (void)K, (void)iters;
    sy_err_set(SY_EINVAL, "cuda backend (device %d): %s", device, SY_NO_CUDA_MSG);
    return -1.0;
}

#endif
