/* Expert parallelism for the Switch layer (model spec §5): each expert lives on one rank (the
 * placement); the tokens routed to it travel there by all-to-all and the outputs come back.
 *
 * Per Switch layer and per round of micro-batches, every rank of the generation calls, in the
 * same order: sy_ep_forward (after sy_switch_route + sy_switch_dispatch on its own micro-batch;
 * before sy_switch_combine) and later sy_ep_backward (after sy_switch_combine_bwd; before
 * sy_switch_dispatch_bwd). A rank without a micro-batch in the round passes sw = NULL: it sends
 * nothing but still receives, serves its experts and answers (spec §5: idle ranks serve).
 *
 * Exchanges, all-to-alls whose every size is known before they start (comm.h): the forward
 * first sends each owner q one int32 per expert of q (rows routed to it, in q's expert order;
 * zeros from an idle rank), a fixed size; then to q the int32 token index of each of those rows
 * followed by the rows [rows, D], sizes known from the counts. The reply carries the expert
 * outputs back in the same row order. The backward sends the output gradients (g·dy) the same
 * way and gets the input gradients back; its sizes are the forward's. Rows are fp32, or bf16
 * (2 bytes, RNE via base/bf16.h) when the backend is in bf16 mode: every row that crosses
 * (dispatched inputs, expert outputs, their gradients) is already bf16-rounded there (model
 * spec §4), so the conversion is exact and halves the bytes. Any placement works (a
 * recovery keeps survivors' experts where they are, so ranks may own scattered experts); rows
 * travel in each owner's expert order and are put back in dispatch order on return.
 *
 * Owner-side activations of a layer are kept from its forward to its backward. Thread: the
 * training thread. */
#ifndef SY_SWITCH_EP_H
#define SY_SWITCH_EP_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"
#include "comm/comm.h"
#include "base/status.h"
#include "model/switch.h"

typedef struct sy_ep sy_ep_t;

/* owner[e] = rank owning expert e. G = tokens per micro-batch.
 * n_layers = number of Switch layers. */
sy_status sy_ep_new(sy_backend_t *be, sy_comm_t *comm, const uint32_t *owner, int E, int D,
                    int F, int G, int n_layers, sy_ep_t **out);
void sy_ep_destroy(sy_ep_t **self_p);

/* Bytes this rank sent to other ranks in the exchanges since sy_ep_new: rows (inputs, outputs
 * and their gradients; bf16 or fp32) and bookkeeping (counts, token indices; int32). */
typedef struct {
    uint64_t row_bytes, meta_bytes;
} sy_ep_stats;
sy_ep_stats sy_ep_get_stats(const sy_ep_t *ep);

/* The experts this rank owns (ascending), and how many. */
int sy_ep_n_owned(const sy_ep_t *ep);
const int *sy_ep_owned(const sy_ep_t *ep);

/* The step's per-expert counts at their owner: for each Switch layer, the tokens routed to each
 * expert this rank owns (sy_ep_owned order), before capacity, by every rank's micro-batches in
 * the forwards since the last reset (evaluation forwards included: reset at the start of a step
 * and read before validating). out: [n_layers, n_owned]. */
void sy_ep_counts_reset(sy_ep_t *ep);
void sy_ep_counts(const sy_ep_t *ep, int32_t *out);

/* key.micro must be the round's first micro-batch index (round·W): the micro-batch of rank p
 * is key.micro + p, which keys expert dropout for p's tokens. sl = index among Switch layers. */
sy_status sy_ep_forward(sy_ep_t *ep, sy_switch_t *sw, int sl, const sy_expert_weights *ex,
                        double dropout, sy_switch_key key);
sy_status sy_ep_backward(sy_ep_t *ep, sy_switch_t *sw, int sl, const sy_expert_weights *ex);

#endif
