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
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "base/log.h"
#include "base/module.h"
#include "base/rng.h"
#include "cuda_module_internal.h"

/* backend_bf16.c (declared in backend_cpu_internal.h, private to the folder above): the bf16
 * storage wrap of a backend with fp32 kernels */
sy_status sy_backend_bf16_maybe(sy_backend_t *inner, bool bf16, sy_backend_t **out);

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

/* sy_module_load's check: the module's table is this host's ABI */
static bool accept_module(void *h, const char *path, void *ctx, char *err, size_t err_len) {
    (void)ctx;
    sy_cuda_module_fn fn = (sy_cuda_module_fn)dlsym(h, SY_CUDA_MODULE_SYMBOL);
    const sy_cuda_module_api *m = fn ? fn() : NULL;
    if (!m || m->abi != SY_CUDA_MODULE_ABI) {
        snprintf(err, err_len, "%.400s is not a CUDA backend module of this build (ABI %d, want %d)",
                 path, m ? m->abi : -1, SY_CUDA_MODULE_ABI);
        return false;
    }
    g_mod = m;
    return true;
}

static void load_once(void) {
    g_host.abi = SY_CUDA_MODULE_ABI;
    g_host.log = host_log;
    g_host.tag_jitter = sy_fnv1a64("router.jitter");
    g_host.tag_dropout = sy_fnv1a64("expert.dropout");
    const sy_module_spec spec = {
        .what = "the CUDA backend module",
        .env_var = "SY_CUDA_MODULE",
        .file = SY_CUDA_MODULE_FILE,
        .build_path = SY_CUDA_MODULE_BUILD_PATH,
        .dlopen_hint = "are the CUDA runtime and cuBLAS libraries installed and on the library path?",
    };
    sy_module_load(&spec, accept_module, NULL, g_load_err, sizeof g_load_err);
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
    /* bf16 storage over the backend's kernels (backend_bf16.c) */
    sy_backend_t *inner = *out;
    *out = NULL;
    return sy_backend_bf16_maybe(inner, bf16, out);
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
