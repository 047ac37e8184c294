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

#endif
