/* The run's history for the dashboard (`GET /v1/history`): per-step series (losses, learning
 * rate, gradient norm, throughput, drop rate, world, generation, expert-load imbalance per
 * layer) and a coarser history of each expert's share of its layer's tokens (the heat map over
 * time).
 *
 * Memory is bounded whatever the run's length: each of the two buffers holds at most a fixed
 * number of records; when one fills, every other record is dropped and only steps that are a
 * multiple of the doubled stride are kept from then on, so the history always spans the whole
 * run at a resolution that halves as it grows. A step that comes again (the steps replayed after
 * a recovery) replaces the records from that step on: the series is the run's surviving
 * timeline, one record per step, steps increasing.
 *
 * Validation losses (train.eval_every) are kept apart, up to SY_HISTORY_VAL of them (every other
 * one dropped when full), so decimating the step series never loses one; they are replayed
 * like the steps. What it does not do: read metrics.jsonl (the coordinator reloads it through
 * sy_history_add on a restart).
 *
 * Thread: one owner (the coordinator's reactor); sy_history_json returns a malloc'ed string the
 * caller owns (the reactor hands it to sy_http_publish_history). */
#ifndef SY_HISTORY_H
#define SY_HISTORY_H

#include <stdint.h>

#include "base/status.h"

/* Records kept of each kind (see above); the per-step series and the load-share samples. */
#define SY_HISTORY_STEPS 4096
#define SY_HISTORY_LOAD_SAMPLES 128
#define SY_HISTORY_VAL 1024

typedef struct sy_history sy_history_t;

/* One completed step, as the coordinator aggregated it (the fields of a metrics.jsonl line). */
typedef struct {
    int64_t step;
    double time; /* Unix seconds */
    double loss, ce, aux, z, lr, grad_norm, tokens_per_s, dropped_frac, step_ms;
    int world;
    uint64_t generation;
    double val_loss; /* NaN: the step validated nothing */
} sy_history_step;

/* layers, experts: the Switch layers and experts per layer (load: [layers * experts]). */
sy_status sy_history_new(int layers, int experts, sy_history_t **out);
void sy_history_destroy(sy_history_t **self_p);
/* Appends a step; load (tokens per expert of each layer, [layers * experts]) may be NULL when
 * the step's counts were not usable. */
void sy_history_add(sy_history_t *self, const sy_history_step *s, const uint64_t *load);
/* Increases each time the content changes (the reactor republishes only then). */
uint64_t sy_history_version(const sy_history_t *self);
/* The `/v1/history` document (docs/architecture.md "Coordinator"); NULL if out of memory. */
char *sy_history_json(const sy_history_t *self);

#endif
