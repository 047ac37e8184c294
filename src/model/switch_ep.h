/* Expert parallelism for the Switch layer (model spec §5): each expert lives on one rank (the
 * placement); the tokens routed to it travel there by all-to-all and the outputs come back.
 *
 * Per Switch layer and per round of micro-batches, every rank of the generation calls, in the
 * same order: sy_ep_forward (after sy_switch_route + sy_switch_dispatch on its own micro-batch;
 * before sy_switch_combine) and later sy_ep_backward (after sy_switch_combine_bwd; before
 * sy_switch_dispatch_bwd). A rank without a micro-batch in the round passes sw = NULL: it sends
 * nothing but still receives, serves its experts and answers (spec §5: idle ranks serve).
 *
 * Wire format of a forward chunk from rank p to owner q: int32 rows per expert of q (q's
 * experts in index order), int32 token index of each row, then the rows (fp32 [rows, D]).
 * The reply carries the expert outputs in the same row order. The backward sends the output
 * gradients (g·dy) the same way and gets the input gradients back. Any placement works (a
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

/* The experts this rank owns (ascending), and how many. */
int sy_ep_n_owned(const sy_ep_t *ep);
const int *sy_ep_owned(const sy_ep_t *ep);

/* key.micro must be the round's first micro-batch index (round·W): the micro-batch of rank p
 * is key.micro + p, which keys expert dropout for p's tokens. sl = index among Switch layers. */
sy_status sy_ep_forward(sy_ep_t *ep, sy_switch_t *sw, int sl, const sy_expert_weights *ex,
                        double dropout, sy_switch_key key);
sy_status sy_ep_backward(sy_ep_t *ep, sy_switch_t *sw, int sl, const sy_expert_weights *ex);

#endif
