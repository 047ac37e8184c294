/* The worker agent (`switchyard-worker`): registers with the coordinator, heartbeats from a
 * thread of its own, executes Assign (rank, peers, placement, restore point, steps), trains
 * with expert parallelism over the data plane, reports every step and its checkpoint parts,
 * and exits cleanly on Stop. The protocol is docs/protocol.md.
 *
 * Threads: the link thread owns the coordinator socket (DEALER) and the heartbeat; the main
 * thread trains. They talk by messages over an inproc pair; the only shared state is a few
 * atomics (generation, step, state) and the current communicator, which the link thread may
 * abort (under a mutex) when an Abort for the running generation arrives. */
#ifndef SY_AGENT_H
#define SY_AGENT_H

#include <stdbool.h>

typedef struct {
    const char *coordinator; /* tcp://host:port */
    const char *id;          /* worker id; NULL: HOST-PID */
    const char *data_bind;   /* data-plane bind address, e.g. tcp://127.0.0.1:* */
    const char *backend;     /* "cpu" or "cuda"; NULL: the run config's cluster.backend */
    int device;              /* CUDA device of the cuda backend (0 by default) */
    const char *comm;        /* data-plane implementation (comm.h sy_comm_kinds); NULL: "tcp" */
    int threads;             /* 0: the config's train.threads (either is capped at the cores) */
    int connect_timeout_s;   /* give up (exit 1) after this long without a Welcome; 0: never */
    /* CurveZMQ on the control plane (src/proto/curve.h): both set, or both NULL (plaintext) */
    const char *curve_server_public; /* the coordinator's .pub (or .key: public half only) */
    const char *curve_key;           /* this worker's .key file (mode 0600) */
    bool insecure; /* --insecure: an off-loopback data plane without CURVE; warned every generation */
} sy_agent_opts;

/* Exit code when the coordinator refuses the connection: our CURVE key is not authorized, or
 * CURVE is on one side only (at the first refusal), or handshakes keep failing
 * (SY_AGENT_HANDSHAKE_MAX_FAILS in a row: e.g. a wrong --curve-server-public). */
#define SY_AGENT_EXIT_REFUSED 4
#define SY_AGENT_HANDSHAKE_MAX_FAILS 5
/* Exit code when the CUDA context is lost (a sticky CUDA error seen by the nccl data plane;
 * the CUDA backend exits with the same code): the launcher or scheduler restarts the process. */
#define SY_AGENT_EXIT_DEVICE 70

/* Default of connect_timeout_s (--connect-timeout). */
#define SY_AGENT_CONNECT_TIMEOUT_S 300

/* Runs until Stop or SIGINT/SIGTERM (which end the process within about 1 s, whatever it is
 * doing). Returns a process exit code: 0 stopped, 1 error (or no coordinator within
 * connect_timeout_s), SY_AGENT_EXIT_REFUSED refused by the coordinator, SY_AGENT_EXIT_DEVICE the
 * device context lost (after a Fault of kind "device"). */
int sy_agent_run(const sy_agent_opts *opts);

#endif
