/* sy_commbench: all-to-all throughput of the tcp data plane (src/comm/comm.h) against a raw ZeroMQ
 * PUSH/PULL exchange of the same bytes, between W processes on loopback, in one run.
 *
 *   sy_commbench [--procs W] [--mb TOTAL_MIB] [--iters N]
 *
 * Each collective moves TOTAL_MIB between processes: every ordered pair (src != dst) carries
 * TOTAL / (W (W-1)) bytes (the chunk to oneself is empty). Iterations alternate the two
 * transports, each preceded by a barrier; an iteration's time is the slowest rank's, and the
 * median over iterations is reported as GB/s (1e9 bytes/s) of bytes moved between processes.
 *
 * Raw baselines: the plainest zmq code for the same exchange: every rank sends one message per
 * peer to the peer's PULL socket and zmq_msg_recv()s W-1 messages (no copy out); once with
 * zmq_send() (zmq copies the buffer into its own message) and once zero-copy
 * (zmq_msg_init_data on the send buffer, no completion tracking: only safe because the buffer
 * outlives the exchange). The tcp data plane does more: 1 MiB chunks with headers, zero-copy
 * sends it waits for, and one copy of every received byte into the caller's recv buffer.
 *
 * CURVE: the same all-to-all on a second tcp data plane per process with CurveZMQ
 * (sy_dataplane_new_curve; one key pair for every rank, as `switchyard run` may hand out), timed in
 * the same iterations, so the CURVE / plaintext ratio compares like with like.
 *
 * Output: one human line, then "RESULT procs=W mb=M tcp_gbs=X raw_gbs=Y raw_zc_gbs=Z ratio=X/Y
 * ratio_zc=X/Z curve_gbs=C curve_ratio=C/X". */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "comm/comm.h"

#define EP_LEN 256
#define MAX_W 16
#define MAX_IT 200
#define WARMUP 2

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static bool read_full(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n) {
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        if (poll(&pf, 1, 120000) <= 0) return false;
        ssize_t r = read(fd, p, n);
        if (r <= 0) return false;
        p += r;
        n -= (size_t)r;
    }
    return true;
}
static bool write_full(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w <= 0) return false;
        p += w;
        n -= (size_t)w;
    }
    return true;
}

typedef struct {
    char comm[EP_LEN], raw[EP_LEN], curve[EP_LEN];
} endpoints;

static char g_pub[41], g_sec[41]; /* the CURVE key pair, made before the fork */

/* One rank: sets up both transports, runs the iterations, writes its times up the pipe. */
static int child(int rank, int W, size_t pair, int iters, int up, int down) {
    sy_dataplane_t *dp = NULL, *dpc = NULL;
    sy_comm_t *c = NULL, *cc = NULL;
    void *rctx = NULL, *pull = NULL, *push[MAX_W] = {0};
    int rc = 1;
    if (sy_dataplane_new("tcp", "tcp://127.0.0.1:*", &dp) != SY_OK) {
        fprintf(stderr, "rank %d: %s\n", rank, sy_err_msg());
        return 1;
    }
    if (sy_dataplane_new_curve("tcp", "tcp://127.0.0.1:*", g_pub, g_sec, &dpc) != SY_OK) {
        fprintf(stderr, "rank %d: %s\n", rank, sy_err_msg());
        goto out;
    }
    rctx = zmq_ctx_new();
    pull = zmq_socket(rctx, ZMQ_PULL);
    int zero = 0;
    zmq_setsockopt(pull, ZMQ_RCVHWM, &zero, sizeof zero);
    zmq_setsockopt(pull, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_bind(pull, "tcp://127.0.0.1:*") != 0) goto out;
    endpoints mine = {{0}, {0}, {0}};
    snprintf(mine.comm, EP_LEN, "%s", sy_dataplane_endpoint(dp));
    snprintf(mine.curve, EP_LEN, "%s", sy_dataplane_endpoint(dpc));
    size_t len = EP_LEN;
    zmq_getsockopt(pull, ZMQ_LAST_ENDPOINT, mine.raw, &len);
    if (!write_full(up, &mine, sizeof mine)) goto out;
    static endpoints all[MAX_W];
    if (!read_full(down, all, (size_t)W * sizeof all[0])) goto out;
    const char *eps[MAX_W];
    for (int r = 0; r < W; r++) eps[r] = all[r].comm;
    if (sy_comm_new(dp, 1, rank, W, eps, 30000, &c) != SY_OK) {
        fprintf(stderr, "rank %d: %s\n", rank, sy_err_msg());
        goto out;
    }
    const char *ceps[MAX_W], *keys[MAX_W];
    for (int r = 0; r < W; r++) ceps[r] = all[r].curve, keys[r] = g_pub;
    if (sy_comm_new_curve(dpc, 1, rank, W, ceps, keys, 30000, &cc) != SY_OK) {
        fprintf(stderr, "rank %d: %s\n", rank, sy_err_msg());
        goto out;
    }
    for (int r = 0; r < W; r++) {
        if (r == rank) continue;
        push[r] = zmq_socket(rctx, ZMQ_PUSH);
        zmq_setsockopt(push[r], ZMQ_SNDHWM, &zero, sizeof zero);
        zmq_setsockopt(push[r], ZMQ_LINGER, &zero, sizeof zero);
        if (zmq_connect(push[r], all[r].raw) != 0) goto out;
    }
    size_t sb[MAX_W], rb[MAX_W];
    for (int r = 0; r < W; r++) sb[r] = rb[r] = r == rank ? 0 : pair;
    char *send = malloc(pair * (size_t)W), *recv = malloc(pair * (size_t)W);
    if (!send || !recv) goto out;
    for (size_t i = 0; i < pair * (size_t)W; i++) send[i] = (char)(i * 31 + (size_t)rank);
    memset(recv, 0, pair * (size_t)W);
    static double t_tcp[MAX_IT], t_raw[MAX_IT], t_zc[MAX_IT], t_cv[MAX_IT];
    for (int it = 0; it < WARMUP + iters; it++) {
        if (sy_comm_barrier(c) != SY_OK) goto fail;
        double t0 = now_s();
        if (sy_comm_alltoallv(c, send, sb, recv, rb) != SY_OK) goto fail;
        double t1 = now_s();
        if (sy_comm_barrier(c) != SY_OK) goto fail;
        double t2 = now_s();
        for (int k = 1; k < W; k++) {
            int dst = (rank + k) % W;
            if (zmq_send(push[dst], send + (size_t)dst * pair, pair, 0) < 0) goto out;
        }
        for (int k = 1; k < W; k++) {
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, pull, 0) < 0 || zmq_msg_size(&m) != pair) goto out;
            zmq_msg_close(&m);
        }
        double t3 = now_s();
        if (sy_comm_barrier(c) != SY_OK) goto fail;
        double t4 = now_s();
        for (int k = 1; k < W; k++) { /* zero-copy: the buffer outlives the exchange */
            int dst = (rank + k) % W;
            zmq_msg_t m;
            zmq_msg_init_data(&m, send + (size_t)dst * pair, pair, NULL, NULL);
            if (zmq_msg_send(&m, push[dst], 0) < 0) goto out;
        }
        for (int k = 1; k < W; k++) {
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, pull, 0) < 0 || zmq_msg_size(&m) != pair) goto out;
            zmq_msg_close(&m);
        }
        double t5 = now_s();
        if (sy_comm_barrier(cc) != SY_OK) goto fail;
        double t6 = now_s();
        if (sy_comm_alltoallv(cc, send, sb, recv, rb) != SY_OK) goto fail;
        double t7 = now_s();
        if (it >= WARMUP) {
            t_cv[it - WARMUP] = t7 - t6;
            t_tcp[it - WARMUP] = t1 - t0;
            t_raw[it - WARMUP] = t3 - t2;
            t_zc[it - WARMUP] = t5 - t4;
        }
    }
    /* Every peer has received our zero-copy raw messages once it reaches this barrier: only
     * then may the send buffer go. */
    if (sy_comm_barrier(c) != SY_OK) goto fail;
    /* the data did arrive */
    for (int r = 0; r < W; r++) {
        if (r == rank) continue;
        if (rb[r] != pair) {
            fprintf(stderr, "rank %d: %zu bytes from rank %d, want %zu\n", rank, rb[r], r, pair);
            goto out;
        }
        /* in r's send buffer our chunk follows r's other non-empty chunks */
        size_t soff = (size_t)(rank < r ? rank : rank - 1) * pair;
        for (size_t i = 0; i < pair; i += 4099)
            if (recv[(size_t)(r < rank ? r : r - 1) * pair + i] != (char)((soff + i) * 31 + (size_t)r)) {
                fprintf(stderr, "rank %d: wrong byte %zu from rank %d\n", rank, i, r);
                goto out;
            }
    }
    size_t tb = sizeof(double) * (size_t)iters;
    if (!write_full(up, t_tcp, tb) || !write_full(up, t_raw, tb) || !write_full(up, t_zc, tb) ||
        !write_full(up, t_cv, tb))
        goto out;
    rc = 0;
    free(send);
    free(recv);
    goto out;
fail:
    fprintf(stderr, "rank %d: %s\n", rank, sy_err_msg());
out:
    sy_comm_destroy(&c);
    sy_comm_destroy(&cc);
    sy_dataplane_destroy(&dpc);
    for (int r = 0; r < W; r++)
        if (push[r]) zmq_close(push[r]);
    if (pull) zmq_close(pull);
    if (rctx) zmq_ctx_term(rctx);
    sy_dataplane_destroy(&dp);
    return rc;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    int W = 2, iters = 10;
    double mb = 64;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--procs") && i + 1 < argc) W = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--mb") && i + 1 < argc) mb = atof(argv[++i]);
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: sy_commbench [--procs W] [--mb TOTAL_MIB] [--iters N]\n");
            return 2;
        }
    }
    if (W < 2 || W > MAX_W || iters < 1 || iters > MAX_IT || mb <= 0) {
        fprintf(stderr, "sy_commbench: need 2 <= procs <= %d, 1 <= iters <= %d, mb > 0\n", MAX_W, MAX_IT);
        return 2;
    }
    size_t pair = (size_t)(mb * 1048576.0) / (size_t)(W * (W - 1));
    if (zmq_curve_keypair(g_pub, g_sec) != 0) {
        fprintf(stderr, "sy_commbench: this libzmq has no CURVE\n");
        return 1;
    }
    double moved = (double)pair * W * (W - 1);
    pid_t pid[MAX_W];
    int up[MAX_W][2], down[MAX_W][2];
    fflush(NULL);
    for (int r = 0; r < W; r++) {
        if (pipe(up[r]) || pipe(down[r])) return 1;
        pid[r] = fork();
        if (pid[r] < 0) return 1;
        if (pid[r] == 0) {
            close(up[r][0]);
            close(down[r][1]);
            _exit(child(r, W, pair, iters, up[r][1], down[r][0]));
        }
        close(up[r][1]);
        close(down[r][0]);
    }
    static endpoints all[MAX_W];
    int rc = 0;
    for (int r = 0; r < W; r++)
        if (!read_full(up[r][0], &all[r], sizeof all[r])) rc = 1;
    for (int r = 0; r < W && !rc; r++)
        if (!write_full(down[r][1], all, (size_t)W * sizeof all[0])) rc = 1;
    static double tcp[MAX_W][MAX_IT], raw[MAX_W][MAX_IT], zc[MAX_W][MAX_IT], cv[MAX_W][MAX_IT];
    for (int r = 0; r < W && !rc; r++)
        if (!read_full(up[r][0], tcp[r], sizeof(double) * (size_t)iters) ||
            !read_full(up[r][0], raw[r], sizeof(double) * (size_t)iters) ||
            !read_full(up[r][0], zc[r], sizeof(double) * (size_t)iters) ||
            !read_full(up[r][0], cv[r], sizeof(double) * (size_t)iters))
            rc = 1;
    for (int r = 0; r < W; r++) {
        int ws;
        if (rc) kill(pid[r], SIGKILL);
        waitpid(pid[r], &ws, 0);
        if (!WIFEXITED(ws) || WEXITSTATUS(ws)) rc = 1;
    }
    if (rc) {
        fprintf(stderr, "sy_commbench: a rank failed\n");
        return 1;
    }
    double mt[MAX_IT], mr[MAX_IT], mz[MAX_IT], mc[MAX_IT];
    for (int i = 0; i < iters; i++) {
        mt[i] = mr[i] = mz[i] = mc[i] = 0;
        for (int r = 0; r < W; r++)
            if (cv[r][i] > mc[i]) mc[i] = cv[r][i];
        for (int r = 0; r < W; r++) {
            if (tcp[r][i] > mt[i]) mt[i] = tcp[r][i];
            if (raw[r][i] > mr[i]) mr[i] = raw[r][i];
            if (zc[r][i] > mz[i]) mz[i] = zc[r][i];
        }
    }
    qsort(mt, (size_t)iters, sizeof *mt, cmp_d);
    qsort(mr, (size_t)iters, sizeof *mr, cmp_d);
    qsort(mz, (size_t)iters, sizeof *mz, cmp_d);
    qsort(mc, (size_t)iters, sizeof *mc, cmp_d);
    double gc = moved / mc[iters / 2] / 1e9;
    double tt = mt[iters / 2], tr = mr[iters / 2], tz = mz[iters / 2];
    double gt = moved / tt / 1e9, gr = moved / tr / 1e9, gz = moved / tz / 1e9;
    printf("procs=%d  %.1f MiB moved per all-to-all (%zu B per pair), median of %d: "
           "tcp data plane %.1f ms (%.2f GB/s); "
           "raw zmq PUSH/PULL zmq_send %.1f ms (%.2f GB/s), zero-copy send %.1f ms (%.2f GB/s); "
           "ratio tcp/raw %.2f, tcp/raw-zero-copy %.2f; CURVE data plane %.1f ms (%.2f GB/s, %.2f of plaintext)\n",
           W, moved / 1048576.0, pair, iters, tt * 1e3, gt, tr * 1e3, gr, tz * 1e3, gz, gt / gr, gt / gz,
           mc[iters / 2] * 1e3, gc, gc / gt);
    printf("RESULT procs=%d mb=%.0f tcp_gbs=%.3f raw_gbs=%.3f raw_zc_gbs=%.3f ratio=%.3f ratio_zc=%.3f curve_gbs=%.3f "
           "curve_ratio=%.3f\n", W, moved / 1048576.0, gt, gr, gz, gt / gr, gt / gz, gc, gc / gt);
    return 0;
}
