/* Private to the CPU backend: its ops are split over files, each installing its part of the
 * table. */
#ifndef SY_BACKEND_CPU_INTERNAL_H
#define SY_BACKEND_CPU_INTERNAL_H

#include "backend/backend.h"

/* backend_cpu_step.c: host <-> backend traffic and the parameter/gradient/optimizer ops. */
void sy_cpu_step_install(sy_backend_t *b);
/* backend_cpu_route.c: the Switch layer's route plan and the expert-parallel wire format. */
void sy_cpu_route_install(sy_backend_t *b);

#endif
