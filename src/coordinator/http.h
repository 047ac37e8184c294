/* The coordinator's HTTP status server (system spec §6), on libmicrohttpd's own thread.
 *
 *   GET  /            self-refreshing HTML dashboard (src/coordinator/dashboard.html, built into
 *                     the binary with /dygraph.min.js and /dygraph.min.css: no external assets)
 *   GET  /v1/status   the status JSON the reactor last published, its "workers" array one page
 *                     at a time (?workers_offset=N&workers_limit=M: default 0 and 1000, at
 *                     most 1000), with "workers_total" and "workers_offset" (400 for a bad query)
 *   GET  /v1/history  the run history the reactor last published (coordinator/history.h)
 *   GET  /metrics     the Prometheus text the reactor last published
 *   POST /v1/checkpoint, /v1/workers/{id}/drain, /v1/stop,
 *        /v1/workers/{id}/lost[?pid=N]  (the launcher: that worker's process exited; with pid,
 *                     only if the registered process has that pid)
 *                     need `Authorization: Bearer <status.token>` (401 without, 403 wrong);
 *                     with no token configured they are refused with 403. Accepted requests
 *                     are queued for the reactor (202).
 * Anything else is 404 (unknown path) or 405 (known path, wrong method), with a JSON error.
 *
 * With auth_get (status.auth_get), GET/HEAD of /v1/status, /v1/history and /metrics need the
 * same header (401/403); the built-in files (/, /dygraph.min.*) hold no run data and stay open,
 * so the dashboard loads and then sends the token (taken from its URL fragment, #token=...).
 * With tls_cert and tls_key (PEM files; the key readable by its owner only) it serves HTTPS only
 * (TLS 1.2 or 1.3, GnuTLS inside libmicrohttpd). Limits: at most SY_HTTP_MAX_CONNECTIONS
 * connections (fewer when the open-files limit is lower), SY_HTTP_MAX_PER_IP from one address,
 * SY_HTTP_CONN_MEMORY bytes for a request's line and headers (larger: 431/413) and a connection
 * idle for SY_HTTP_CONN_TIMEOUT seconds is closed; the server thread polls with epoll and never
 * blocks on one client, so slow or silent clients only cost a descriptor each.
 *
 * The HTTP thread never touches reactor state: the reactor publishes whole documents with
 * sy_http_publish() (swapped in under a mutex) and drains requests with sy_http_next_cmd().
 *
 * Thread: sy_http_start/publish/next_cmd/destroy from the reactor thread only. */
#ifndef SY_HTTP_H
#define SY_HTTP_H

#include <stdbool.h>
#include <stdint.h>

#include "base/status.h"

typedef enum {
    SY_HTTP_CMD_CHECKPOINT = 1,
    SY_HTTP_CMD_DRAIN = 2,
    SY_HTTP_CMD_STOP = 3,
    SY_HTTP_CMD_LOST = 4
} sy_http_cmd_kind;

typedef struct {
    sy_http_cmd_kind kind;
    char arg[128]; /* DRAIN, LOST: the worker id */
    uint32_t pid;  /* LOST: the exited process's pid (0: not given) */
} sy_http_cmd;

typedef struct sy_http sy_http_t;

typedef struct {
    const char *token;    /* bearer token of the mutating endpoints ("" or NULL: none) */
    bool auth_get;        /* the run data (GET /v1/status, /v1/history, /metrics) needs it too */
    const char *tls_cert; /* PEM certificate (chain) file; with tls_key: HTTPS ("" or NULL: HTTP) */
    const char *tls_key;  /* PEM private key file, unencrypted, mode 0600 or stricter */
} sy_http_opts;

/* Starts serving on addr ("host:port"; port 0 picks a free port; host an IPv4 address or
 * "localhost"). opts NULL: plain HTTP, no token. Errors name the file or option at fault
 * (auth_get without a token, one of tls_cert/tls_key without the other, a key file that others
 * can read, a file that is not PEM, a key that does not belong to the certificate). */
sy_status sy_http_start(const char *addr, const sy_http_opts *opts, sy_http_t **out);
/* The port actually bound. */
int sy_http_port(const sy_http_t *self);
/* 1 when serving HTTPS. */
int sy_http_tls(const sy_http_t *self);
/* Replaces the published documents, taking ownership of every malloc'ed string: status_json is
 * the status object without its "workers" array, workers_json[n_workers] (a malloc'ed array)
 * that array's elements, each a compact JSON object; NULL status_json or metrics_text keeps the
 * current one (and then workers_json must be NULL). */
void sy_http_publish(sy_http_t *self, char *status_json, char **workers_json, size_t n_workers,
                     char *metrics_text);
/* Replaces the published history document (takes ownership; NULL keeps the current one). */
void sy_http_publish_history(sy_http_t *self, char *history_json);
/* Dequeues the oldest pending request into *out: 1 if there was one, else 0. */
int sy_http_next_cmd(sy_http_t *self, sy_http_cmd *out);
/* Stops the server thread and frees everything; *self_p = NULL. Safe on NULL. */
void sy_http_destroy(sy_http_t **self_p);

#endif
