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

typedef struct {
    const char *coordinator; /* tcp://host:port */
    const char *id;          /* worker id; NULL: HOST-PID */
    const char *data_bind;   /* data-plane bind address, e.g. tcp://127.0.0.1:* */
    const char *backend;     /* "cpu" */
    int threads;             /* 0: the config's train.threads */
} sy_agent_opts;

/* Runs until Stop or SIGINT/SIGTERM. Returns a process exit code. */
int sy_agent_run(const sy_agent_opts *opts);

#endif
