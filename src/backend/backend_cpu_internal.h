/* Private to the CPU backend: its ops are split over files, each installing its part of the
 * table. */
#ifndef SY_BACKEND_CPU_INTERNAL_H
#define SY_BACKEND_CPU_INTERNAL_H

#include "backend/backend.h"

/* backend_cpu_step.c: host <-> backend traffic and the parameter/gradient/optimizer ops. */
void sy_cpu_step_install(sy_backend_t *b);
/* backend_cpu_route.c: the Switch layer's route plan and the expert-parallel wire format. */
void sy_cpu_route_install(sy_backend_t *b);

/* backend_poison.c: wraps `inner` (taking ownership, also on failure) in the poisoned-handle
 * variant; sy_backend_cpu_new does it when SY_BACKEND_POISON=1. SY_EINTERNAL if an op of
 * `inner` has no wrapper. */
sy_status sy_backend_poison_wrap(sy_backend_t *inner, sy_backend_t **out);

/* backend_cpu.c: *out = the poisoned variant of `inner` when SY_BACKEND_POISON=1 is set in
 * the environment, else inner itself (ownership passes either way). */
sy_status sy_backend_poison_maybe(sy_backend_t *inner, sy_backend_t **out);

/* backend_cpu.c: the CPU backend itself, never poisoned (the emulation backend builds on it). */
sy_status sy_backend_cpu_new_plain(int threads, bool bf16, sy_backend_t **out);

/* backend_emu.c: sy_backend_emu_new with the thread count of sy_backend_cpu_new (0: all cores;
 * its OpenMP loops and the wrapped CPU backend's GEMMs use that many). */
sy_status sy_backend_emu_new_threads(int threads, bool bf16, sy_backend_t **out);

/* backend_bf16.c: wraps `inner` (a backend with fp32 kernels; ownership passes, also on
 * failure) in bf16 storage: activation buffers of storage_es bytes an element (2: bf16; 4: fp32
 * holding bf16 values, for the test that both give the same bits). */
sy_status sy_backend_bf16_wrap(sy_backend_t *inner, int storage_es, sy_backend_t **out);
/* *out = inner when !bf16, else the bf16 wrap of inner with the storage SY_BF16_STORAGE names
 * ("bf16", the default, or "f32"); ownership passes either way. */
sy_status sy_backend_bf16_maybe(sy_backend_t *inner, bool bf16, sy_backend_t **out);
/* The storage bytes of the live activation buffers of a bf16 wrap (0 for any other backend). */
size_t sy_backend_bf16_storage_bytes(sy_backend_t *be);

#endif
