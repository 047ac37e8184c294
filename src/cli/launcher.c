#include "cli/launcher.h"
#include "base/clock.h"

#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "storage/ckpt.h"
#include "storage/ckpt_run.h"
#include "base/config.h"
#include "proto/curve.h"
#include "comm/comm.h"
#include "data/data.h"
#include "data/data_s3.h"
#include "base/fsutil.h"
#include "backend/backend.h"
#include "backend/cpu_setup.h"
#include "base/log.h"
#include "base/secret.h"
#include "model/memplan.h"
#include "storage/store.h"
#include "storage/store_s3.h"
#include "storage/curl_check.h"

/* SY_CUDA_SHARE_GPU=1 (run_configure): the GPUs the workers share round-robin; 0: one each. */
static int g_ngpu_shared;

#define SY_LAUNCH_READY_TIMEOUT_MS 30000
#define SY_LAUNCH_GRACE_MS 10000
#define SY_LAUNCH_TICK_MS 200
/* Bound of one lost-worker report to the coordinator (connect + answer). */
#define SY_LAUNCH_REPORT_TIMEOUT_MS 1000
/* Items of one --chaos spec. */
#define SY_CHAOS_MAX_ITEMS 64
#define SY_CHAOS_DEFAULT_RESPAWN_DELAY_S 1.0
#define SY_CHAOS_DEFAULT_RESTART_DELAY_S 0.5

static volatile sig_atomic_t l_interrupted = 0;
static void l_on_signal(int sig) {
    (void)sig;
    l_interrupted++;
}
/* SIGCHLD only interrupts the tick's sleep, so that an exit is handled at once. */
static void l_on_child(int sig) { (void)sig; }



static void usage(FILE *f) {
    fprintf(f,
            "usage: switchyard run CONFIG [--workers N] [options]\n"
            "\n"
            "Runs a local cluster: a coordinator and N workers as child processes on loopback,\n"
            "training the run of CONFIG with expert parallelism. One progress line; Ctrl-C stops\n"
            "everything cleanly. Exit status 0 when the run completed.\n"
            "\n"
            "options:\n"
            "  --workers N                 worker processes (default 2)\n"
            "  --set SECTION.FIELD=VALUE   override a config field (repeatable), passed to the\n"
            "                              coordinator, which hands the config to the workers\n"
            "  --threads N                 compute threads per worker (default: 2 / N, at least 1)\n"
            "  --chaos SPEC                inject faults (below); repeatable, items accumulate\n"
            "  --chaos-seed N              seed of the chaos's random choices (default: random,\n"
            "                              printed at start and in chaos.jsonl)\n"
            "  --resume                    continue the run from its latest committed checkpoint\n"
            "                              in checkpoint.store (the model and data-order fields\n"
            "                              must match it); without it a store that holds\n"
            "                              committed checkpoints of the run is refused\n"
            "  --overwrite                 start afresh: move such a run aside to\n"
            "                              RUN.replaced-<time> first\n"
            "  --quiet                     no progress line\n"
            "  -h, --help                  this help\n"
            "\n"
            "A worker process that exits is reported to the coordinator at once (POST\n"
            "/v1/workers/ID/lost with the status token: status.token, status.token_file or\n"
            "$SY_STATUS_TOKEN, else a random one). When every worker has exited and none will be\n"
            "respawned, the launcher stops the coordinator and exits 1.\n"
            "\n"
            "Security: the control plane uses CurveZMQ with per-run keys (unless the config has\n"
            "its own cluster.curve_* keys, or cluster.insecure: true), made in a private folder\n"
            "$TMPDIR/switchyard-run-XXXXXX (mode 0700) that also holds the token file the\n"
            "coordinator reads; no secret is on a command line. The folder is removed when the\n"
            "command ends, also after an error, Ctrl-C or SIGTERM.\n"
            "\n"
            "Chaos SPEC: comma-separated items, ACTION@TRIGGER or OPTION.\n"
            "  ACTION   kill-worker | kill-workers=N    SIGKILL 1 / N random running workers\n"
            "           stop-worker | stop-workers=N    SIGSTOP them (see cont-after)\n"
            "           kill-coordinator                SIGKILL the coordinator, then start it\n"
            "                                           again with the same config and ports\n"
            "  TRIGGER  step=N      once, when metrics.jsonl first reaches step N\n"
            "           every=DUR   every DUR, counted from the first completed step\n"
            "           at=DUR      once, DUR after the first completed step\n"
            "  OPTION   respawn[=new|same]  restart workers that died (killed or crashed) after\n"
            "                       respawn-delay, under a new id (default) or the old one\n"
            "           respawn-delay=DUR   (default 1s)\n"
            "           cont-after=DUR      SIGCONT a stopped worker DUR after its SIGSTOP\n"
            "                               (default: it stays stopped)\n"
            "           restart-delay=DUR   coordinator restart delay (default 500ms)\n"
            "  DUR      a number with ms, s or m (no unit: seconds)\n"
            "  e.g.  --chaos kill-worker@every=60s,respawn=new\n"
            "        --chaos kill-workers=2@step=40 --chaos kill-coordinator@step=80\n"
            "        --chaos stop-worker@step=25,cont-after=5s\n"
            "Every injected fault is printed and appended to RUN.state_dir/chaos.jsonl as\n"
            "{\"event\": \"chaos\", \"action\", \"target\", \"pid\", \"step\", \"time\"} (wall-clock\n"
            "seconds, like events.jsonl); the file is rewritten by each run with --chaos.\n"
            "\n"
            "Logs: RUN.state_dir/logs/coordinator.log and worker-K.log. Metrics: the\n"
            "coordinator's RUN.state_dir/metrics.jsonl and events.jsonl; while it runs, the status\n"
            "endpoint printed at start (switchyard status --url URL).\n");
}

/* ---------------------------------------------------------------------------------------- */
/* Chaos spec                                                                                */

typedef enum { CH_KILL_WORKER, CH_STOP_WORKER, CH_KILL_COORD } ch_action;
typedef enum { TR_STEP, TR_EVERY, TR_AT } ch_trigger;
typedef enum { RESPAWN_NONE = 0, RESPAWN_NEW, RESPAWN_SAME } respawn_mode;

typedef struct {
    ch_action action;
    int count;        /* workers hit at once */
    ch_trigger trigger;
    int64_t step;     /* TR_STEP */
    double period_s;  /* TR_EVERY, TR_AT */
    double next_s;    /* launcher clock of the next firing (timed triggers, once training runs) */
    bool done;
} ch_item;

typedef struct {
    ch_item items[SY_CHAOS_MAX_ITEMS];
    int n;
    respawn_mode respawn;
    double respawn_delay_s;
    double cont_after_s;  /* < 0: a stopped worker stays stopped */
    double restart_delay_s;
} ch_spec;

/* "20s", "500ms", "2m", "1.5" (seconds). */
static bool parse_dur(const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno || !isfinite(v) || v < 0) return false;
    if (!strcmp(end, "ms")) v /= 1e3;
    else if (!strcmp(end, "m")) v *= 60;
    else if (*end && strcmp(end, "s") != 0) return false;
    if (v > 1e7) return false;
    *out = v;
    return true;
}

static bool parse_int(const char *s, int64_t lo, int64_t hi, int64_t *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (end == s || *end || errno || v < lo || v > hi) return false;
    *out = v;
    return true;
}

static sy_status chaos_item_parse(char *item, ch_spec *sp) {
    char *at = strchr(item, '@');
    if (!at) { /* an option */
        char *eq = strchr(item, '=');
        const char *val = eq ? eq + 1 : NULL;
        if (eq) *eq = 0;
        if (!strcmp(item, "respawn")) {
            if (!val || !strcmp(val, "new")) sp->respawn = RESPAWN_NEW;
            else if (!strcmp(val, "same")) sp->respawn = RESPAWN_SAME;
            else return sy_err_set(SY_EINVAL, "--chaos: respawn=%s: expected respawn, respawn=new or respawn=same", val);
            return SY_OK;
        }
        double *dst = !strcmp(item, "respawn-delay") ? &sp->respawn_delay_s
                      : !strcmp(item, "cont-after")  ? &sp->cont_after_s
                      : !strcmp(item, "restart-delay") ? &sp->restart_delay_s
                                                       : NULL;
        if (!dst)
            return sy_err_set(SY_EINVAL, "--chaos: '%s' is neither ACTION@TRIGGER nor an option (respawn, "
                              "respawn-delay, cont-after, restart-delay)", item);
        if (!val || !parse_dur(val, dst))
            return sy_err_set(SY_EINVAL, "--chaos: %s=%s: expected a duration such as 5s, 500ms or 2m", item,
                              val ? val : "");
        return SY_OK;
    }
    *at = 0;
    const char *act = item, *trig = at + 1;
    if (sp->n == SY_CHAOS_MAX_ITEMS) return sy_err_set(SY_EINVAL, "--chaos: more than %d actions", SY_CHAOS_MAX_ITEMS);
    ch_item it;
    memset(&it, 0, sizeof it);
    it.count = 1;
    int64_t v;
    if (!strcmp(act, "kill-worker")) it.action = CH_KILL_WORKER;
    else if (!strcmp(act, "stop-worker")) it.action = CH_STOP_WORKER;
    else if (!strcmp(act, "kill-coordinator")) it.action = CH_KILL_COORD;
    else if (!strncmp(act, "kill-workers=", 13) || !strncmp(act, "stop-workers=", 13)) {
        it.action = act[0] == 'k' ? CH_KILL_WORKER : CH_STOP_WORKER;
        if (!parse_int(act + 13, 1, 4096, &v))
            return sy_err_set(SY_EINVAL, "--chaos: %s: expected a count in [1, 4096]", act);
        it.count = (int)v;
    } else {
        return sy_err_set(SY_EINVAL, "--chaos: unknown action '%s' (kill-worker, kill-workers=N, stop-worker, "
                          "stop-workers=N, kill-coordinator)", act);
    }
    if (!strncmp(trig, "step=", 5)) {
        it.trigger = TR_STEP;
        if (!parse_int(trig + 5, 1, INT64_MAX / 2, &it.step))
            return sy_err_set(SY_EINVAL, "--chaos: %s@%s: expected step=N with N >= 1", act, trig);
    } else if (!strncmp(trig, "every=", 6) || !strncmp(trig, "at=", 3)) {
        bool every = trig[0] == 'e';
        it.trigger = every ? TR_EVERY : TR_AT;
        if (!parse_dur(trig + (every ? 6 : 3), &it.period_s) || (every && it.period_s <= 0))
            return sy_err_set(SY_EINVAL, "--chaos: %s@%s: expected a %sduration such as 20s", act, trig,
                              every ? "positive " : "");
    } else {
        return sy_err_set(SY_EINVAL, "--chaos: %s@%s: unknown trigger (step=N, every=DUR, at=DUR)", act, trig);
    }
    sp->items[sp->n++] = it;
    return SY_OK;
}

static sy_status chaos_parse(const char *spec, ch_spec *sp) {
    char *copy = strdup(spec), *save = NULL;
    if (!copy) return sy_err_set(SY_ENOMEM, "out of memory");
    sy_status st = SY_OK;
    int items = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok && st == SY_OK; tok = strtok_r(NULL, ",", &save)) {
        while (*tok == ' ') tok++;
        size_t n = strlen(tok);
        while (n && tok[n - 1] == ' ') tok[--n] = 0;
        if (!n) continue;
        items++;
        st = chaos_item_parse(tok, sp);
    }
    if (st == SY_OK && items == 0) st = sy_err_set(SY_EINVAL, "--chaos '%s': no items", spec);
    free(copy);
    return st;
}

/* ---------------------------------------------------------------------------------------- */
/* Processes                                                                                 */

typedef struct {
    pid_t pid;          /* > 0 while the process runs */
    char id[32];
    int log_index;      /* worker-K.log */
    bool stopped;       /* SIGSTOPped by the chaos */
    double cont_at;     /* launcher clock of its SIGCONT (0: none) */
    double respawn_at;  /* launcher clock of its respawn (0: none) */
    int device;         /* its CUDA device (cluster.backend: cuda) */
} wproc;

typedef struct {
    const char *coord_bin, *worker_bin, *config_path;
    char logdir[PATH_MAX];
    char coord_log[PATH_MAX + 64];
    char **sets;
    int n_sets;
    char token[SY_SECRET_MAX + 1]; /* the status token (POST /v1/workers/ID/lost) */
    const char *tls_ca; /* CA file of the coordinator's HTTPS server (NULL: plain HTTP) */
    /* The run's 0700 folder (removed at the end): the token file, and per-run CURVE keys when
     * the config has none and does not say cluster.insecure. "" until made. */
    char secdir[PATH_MAX];
    char sec_sets[6][PATH_MAX + 48]; /* --set values for the coordinator: token file, keys */
    int n_sec_sets;
    char run_pub[PATH_MAX + 32], run_key[PATH_MAX + 32]; /* the per-run workers' CURVE flags */
    bool quiet, tty;
    bool line_open;      /* a progress line without its newline is on the terminal */
    int threads;
    const char *curve_pub, *curve_key; /* the workers' CURVE flags (NULL: plaintext) */
    const char *comm;                  /* the workers' data plane (cluster.comm) */
    bool cuda;                         /* cluster.backend: cuda: worker k gets --device k */
    /* coordinator */
    pid_t coord;
    int coord_fd;
    char bind[512], status[512];
    /* workers */
    wproc *w;
    int nw, capw, next_index;
    /* chaos */
    FILE *chaos_f;
    uint64_t rng;
    bool curl_ready; /* curl_global_init done: cleaned up at the end */
} lctx;

static void note(lctx *L, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(lctx *L, const char *fmt, ...) {
    if (L->line_open) fputc('\n', stderr);
    L->line_open = false;
    va_list ap;
    va_start(ap, fmt);
    fputs("switchyard run: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static pid_t spawn(char *const argv[], const char *log_path, int stdout_fd) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    /* child */
    setpgid(0, 0); /* Ctrl-C goes to the launcher, which stops children in order */
    unsetenv(SY_STATUS_TOKEN_ENV); /* the coordinator reads the run's token file instead */
    int fd = sy_fs_open_regular(log_path, 1); /* never a FIFO, device or symlink */
    if (fd >= 0) {
        dup2(fd, STDERR_FILENO);
        if (stdout_fd < 0) dup2(fd, STDOUT_FILENO);
        close(fd);
    }
    if (stdout_fd >= 0) dup2(stdout_fd, STDOUT_FILENO);
    execv(argv[0], argv);
    fprintf(stderr, "cannot execute %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

static void print_tail(const char *path, int lines) {
    FILE *f = fopen(path, "r");
    if (!f) return;
    char *buf[64] = {0};
    char *line = NULL;
    size_t cap = 0;
    int n = 0;
    if (lines > 64) lines = 64;
    while (getline(&line, &cap, f) > 0) {
        free(buf[n % lines]);
        buf[n % lines] = strdup(line);
        n++;
    }
    free(line);
    fclose(f);
    fprintf(stderr, "---- last lines of %s ----\n", path);
    for (int i = n > lines ? n - lines : 0; i < n; i++) fputs(buf[i % lines], stderr);
    for (int i = 0; i < 64; i++) free(buf[i]);
}


/* Reads the coordinator's "coordinator ready bind=... status=..." line within timeout_ms. */
static bool read_ready(lctx *L, int timeout_ms) {
    char buf[2048];
    size_t len = 0;
    double t0 = sy_mono_s();
    for (;;) {
        int left = timeout_ms - (int)((sy_mono_s() - t0) * 1e3);
        if (left <= 0) return false;
        struct pollfd p = {.fd = L->coord_fd, .events = POLLIN};
        int r = poll(&p, 1, left);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return false;
        ssize_t n = read(L->coord_fd, buf + len, sizeof buf - 1 - len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false; /* it exited */
        len += (size_t)n;
        buf[len] = 0;
        char *nl;
        while ((nl = strchr(buf, '\n')) != NULL) {
            *nl = 0;
            if (sscanf(buf, "coordinator ready bind=%511s status=%511s", L->bind, L->status) == 2) return true;
            size_t used = (size_t)(nl + 1 - buf);
            memmove(buf, nl + 1, len - used + 1);
            len -= used;
        }
        if (len == sizeof buf - 1) len = 0; /* a very long line: drop it */
    }
}

/* Starts the coordinator; `restart`: on the ports of the previous one. */
static bool start_coordinator(lctx *L, int expect, bool restart) {
    char **cargv = calloc((size_t)(2 * L->n_sets + 2 * L->n_sec_sets + 16), sizeof(char *));
    if (!cargv) return false;
    char exp[16], status_addr[512];
    snprintf(exp, sizeof exp, "%d", expect);
    int ca = 0;
    cargv[ca++] = (char *)L->coord_bin;
    cargv[ca++] = (char *)L->config_path;
    for (int i = 0; i < L->n_sets; i++) cargv[ca++] = "--set", cargv[ca++] = L->sets[i];
    for (int i = 0; i < L->n_sec_sets; i++) cargv[ca++] = "--set", cargv[ca++] = L->sec_sets[i];
    cargv[ca++] = "--bind";
    if (restart) {
        const char *s = L->status;
        if (!strncmp(s, "http://", 7)) s += 7;
        else if (!strncmp(s, "https://", 8)) s += 8;
        snprintf(status_addr, sizeof status_addr, "%s", s);
        cargv[ca++] = L->bind;
        cargv[ca++] = "--status-addr";
        cargv[ca++] = status_addr;
    } else {
        cargv[ca++] = "tcp://127.0.0.1:0";
        cargv[ca++] = "--status-addr";
        cargv[ca++] = "127.0.0.1:0";
    }
    cargv[ca++] = "--expect-workers";
    cargv[ca++] = exp;
    int pfd[2];
    bool ok = false;
    if (pipe2(pfd, O_CLOEXEC) != 0) {
        free(cargv);
        return false;
    }
    char want_bind[512];
    snprintf(want_bind, sizeof want_bind, "%s", L->bind);
    L->coord = spawn(cargv, L->coord_log, pfd[1]);
    free(cargv);
    close(pfd[1]);
    if (L->coord_fd >= 0) close(L->coord_fd);
    L->coord_fd = pfd[0];
    if (L->coord > 0) ok = read_ready(L, SY_LAUNCH_READY_TIMEOUT_MS);
    if (ok && restart && strcmp(want_bind, L->bind) != 0) {
        note(L, "the restarted coordinator bound %s instead of %s", L->bind, want_bind);
        ok = false;
    }
    return ok;
}

static int live_workers(const lctx *L, bool count_stopped) {
    int n = 0;
    for (int i = 0; i < L->nw; i++) n += L->w[i].pid > 0 && (count_stopped || !L->w[i].stopped);
    return n;
}

static bool spawn_worker(lctx *L, int k) {
    wproc *w = &L->w[k];
    char th[16], dev[16], path[PATH_MAX + 64];
    snprintf(th, sizeof th, "%d", L->threads);
    /* one GPU per worker: the first workers get devices 0..n-1; a respawn under a new id
     * inherits the device of the worker it replaces */
    snprintf(dev, sizeof dev, "%d", w->device);
    char *wargv[] = {(char *)L->worker_bin, "--coordinator", L->bind, "--id", w->id, "--threads", th,
                     "--comm", (char *)L->comm, "--backend", L->cuda ? "cuda" : "cpu", "--device", dev,
                     L->curve_key ? "--curve-server-public" : NULL, (char *)L->curve_pub, "--curve-key",
                     (char *)L->curve_key, NULL};
    snprintf(path, sizeof path, "%s/worker-%d.log", L->logdir, w->log_index);
    w->pid = spawn(wargv, path, -1);
    w->stopped = false;
    w->cont_at = w->respawn_at = 0;
    return w->pid > 0;
}

/* A new worker table entry w<next_index>; -1 if out of memory. */
static int add_worker(lctx *L) {
    if (L->nw == L->capw) {
        int nc = L->capw ? 2 * L->capw : 8;
        wproc *nw = realloc(L->w, sizeof(wproc) * (size_t)nc);
        if (!nw) return -1;
        L->w = nw;
        L->capw = nc;
    }
    wproc *w = &L->w[L->nw];
    memset(w, 0, sizeof *w);
    w->pid = -1;
    w->log_index = L->next_index++;
    snprintf(w->id, sizeof w->id, "w%d", w->log_index);
    w->device = g_ngpu_shared > 0 ? L->nw % g_ngpu_shared : L->nw; /* device k for worker k */
    return L->nw++;
}

/* CURVE on: the workers' keys must be set and fit the coordinator's, or every worker would be
 * refused; checked here so that a mistake is one clear error before any process starts. */
static sy_status check_curve(const sy_config_t *cfg) {
    const char *sk = cfg->cluster.curve_server_key;
    if (!sk || !*sk) return SY_OK;
    if (!cfg->cluster.curve_server_public[0])
        return sy_err_set(SY_EINVAL, "cluster.curve_server_public = \"\": must be set when cluster.curve_server_key "
                                     "is set (switchyard run gives it to the workers)");
    if (!cfg->cluster.curve_worker_key[0])
        return sy_err_set(SY_EINVAL, "cluster.curve_worker_key = \"\": must be set when cluster.curve_server_key is "
                                     "set (the key pair of the workers switchyard run starts)");
    SY_CHECK(sy_curve_available("cluster.curve_server_key"));
    sy_curve_key server, pub, worker;
    sy_status s = sy_curve_load_key(sk, true, &server);
    if (s != SY_OK) return sy_err_prefix(s, "cluster.curve_server_key");
    sy_curve_key_wipe(&server);
    if ((s = sy_curve_load_key(cfg->cluster.curve_server_public, false, &pub)) != SY_OK)
        return sy_err_prefix(s, "cluster.curve_server_public");
    if (strcmp(pub.public_z85, server.public_z85) != 0)
        return sy_err_set(SY_EINVAL, "cluster.curve_server_public = %s: not the public key of cluster.curve_server_key (%s)",
                          cfg->cluster.curve_server_public, sk);
    if ((s = sy_curve_load_key(cfg->cluster.curve_worker_key, true, &worker)) != SY_OK)
        return sy_err_prefix(s, "cluster.curve_worker_key");
    sy_curve_key_wipe(&worker);
    sy_curve_keyset_t *keys = NULL;
    if ((s = sy_curve_keyset_load(cfg->cluster.curve_authorized_keys, &keys)) != SY_OK)
        return sy_err_prefix(s, "cluster.curve_authorized_keys");
    uint8_t raw[32];
    bool listed = sy_curve_z85_ok(worker.public_z85, raw) && sy_curve_keyset_has(keys, raw);
    sy_curve_keyset_destroy(&keys);
    if (!listed)
        return sy_err_set(SY_EINVAL,
                          "cluster.curve_worker_key = %s: its public key %s is not listed in "
                          "cluster.curve_authorized_keys (%s): the coordinator would refuse every worker",
                          cfg->cluster.curve_worker_key, worker.public_z85, cfg->cluster.curve_authorized_keys);
    return SY_OK;
}

static size_t discard(char *p, size_t size, size_t n, void *ud) {
    (void)p;
    (void)ud;
    return size * n;
}

/* Tells the coordinator that a worker's process exited (bounded; a failure is only logged). */
static void report_lost(lctx *L, const char *id, pid_t pid) {
    if (L->coord <= 0 || !L->status[0]) return;
    char url[768], auth[160];
    snprintf(url, sizeof url, "%s/v1/workers/%s/lost?pid=%d", L->status, id, (int)pid);
    snprintf(auth, sizeof auth, "Authorization: Bearer %s", L->token);
    CURL *h = curl_easy_init();
    if (!h) return;
    struct curl_slist *hdr = curl_slist_append(NULL, auth);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_POST, 1L);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, "");
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, 0L);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)SY_LAUNCH_REPORT_TIMEOUT_MS);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)SY_LAUNCH_REPORT_TIMEOUT_MS);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, discard);
    if (L->tls_ca) { /* its own coordinator on loopback: the certificate is checked against the
                      * CA, not against the name (issued for the server's public name) */
        curl_easy_setopt(h, CURLOPT_CAINFO, L->tls_ca);
        curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 0L);
    }
    CURLcode rc = curl_easy_perform(h);
    long code = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    if (sy_curl_check(rc, NULL, "could not report worker %s to the coordinator", id) != SY_OK) note(L, "%s", sy_err_msg());
    else if (code != 202 && !L->quiet) note(L, "the coordinator answered %ld to the report of worker %s", code, id);
    curl_slist_free_all(hdr);
    curl_easy_cleanup(h);
}

static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void chaos_event(lctx *L, const char *action, const char *target, pid_t pid, int64_t step) {
    json_t *e = json_pack("{s:s, s:s, s:s, s:i, s:I, s:f}", "event", "chaos", "action", action, "target", target,
                          "pid", (int)pid, "step", (json_int_t)step, "time", sy_wall_s());
    char *line = e ? json_dumps(e, JSON_COMPACT) : NULL;
    if (line && L->chaos_f) {
        fprintf(L->chaos_f, "%s\n", line);
        fflush(L->chaos_f);
    }
    free(line);
    json_decref(e);
    note(L, "chaos: %s %s (pid %d) at step %" PRId64, action, target, (int)pid, step);
}

/* Fires one chaos item. */
static void chaos_fire(lctx *L, const ch_item *it, int64_t step, bool *coord_killed) {
    if (it->action == CH_KILL_COORD) {
        if (L->coord <= 0) return;
        kill(L->coord, SIGKILL);
        *coord_killed = true;
        chaos_event(L, "kill-coordinator", "coordinator", L->coord, step);
        return;
    }
    int *cand = malloc(sizeof(int) * (size_t)(L->nw ? L->nw : 1));
    int n = 0;
    if (!cand) return;
    for (int i = 0; i < L->nw; i++)
        if (L->w[i].pid > 0 && !L->w[i].stopped) cand[n++] = i;
    if (n == 0) note(L, "chaos: no running worker to %s", it->action == CH_KILL_WORKER ? "kill" : "stop");
    for (int k = 0; k < it->count && k < n; k++) { /* partial Fisher-Yates */
        int j = k + (int)(rng_next(&L->rng) % (uint64_t)(n - k));
        int t = cand[k];
        cand[k] = cand[j];
        cand[j] = t;
        wproc *w = &L->w[cand[k]];
        if (it->action == CH_KILL_WORKER) {
            kill(w->pid, SIGKILL);
            chaos_event(L, "kill-worker", w->id, w->pid, step);
        } else {
            kill(w->pid, SIGSTOP);
            w->stopped = true;
            chaos_event(L, "stop-worker", w->id, w->pid, step);
        }
    }
    free(cand);
}

#define RUN_GO (-1) /* a step's "go on" (any other value is the exit code) */

/* What the command line asks for. */
typedef struct {
    int n_workers, threads; /* threads 0: the cores shared among the workers */
    bool quiet, have_seed, resume, overwrite;
    uint64_t seed;
    char **sets; /* the --set values (pointers into argv) */
    int n_sets;
    char *chaos_text; /* the --chaos specs joined with ',' (NULL: none) */
    ch_spec *chaos;
    const char *config_path;
} run_opts;

/* An integer option in [lo, hi]; false if it is not one. */
static bool opt_int(const char *s, long lo, long hi, int *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi) return false;
    *out = (int)v;
    return true;
}

/* Appends one --chaos SPEC to the joined text; false when out of memory. */
static bool chaos_text_add(run_opts *o, const char *spec) {
    size_t have = o->chaos_text ? strlen(o->chaos_text) : 0;
    char *n = realloc(o->chaos_text, have + strlen(spec) + 2);
    if (!n) return false;
    if (have) n[have++] = ',';
    strcpy(n + have, spec);
    o->chaos_text = n;
    return true;
}

/* One option of getopt_long; RUN_GO or the exit code. */
static int run_option(int c, run_opts *o) {
    switch (c) {
    case 'w':
        if (!opt_int(optarg, 1, 256, &o->n_workers)) {
            fprintf(stderr, "switchyard run: --workers %s: expected an integer in [1, 256]\n", optarg);
            return 2;
        }
        return RUN_GO;
    case 't': {
        int cores = sy_cpu_count();
        if (!opt_int(optarg, 1, cores, &o->threads)) {
            fprintf(stderr,
                    "switchyard run: --threads %s: expected an integer from 1 to %d (the cores this process may "
                    "use; each worker gets this many)\n",
                    optarg, cores);
            return 2;
        }
        return RUN_GO;
    }
    case 'c': return chaos_text_add(o, optarg) ? RUN_GO : 2;
    case 'S': {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(optarg, &end, 10);
        if (!*optarg || *end || errno || optarg[0] == '-') {
            fprintf(stderr, "switchyard run: --chaos-seed %s: expected a non-negative integer\n", optarg);
            return 2;
        }
        o->seed = v;
        o->have_seed = true;
        return RUN_GO;
    }
    case 's': o->sets[o->n_sets++] = optarg; return RUN_GO;
    case 'q': o->quiet = true; return RUN_GO;
    case 'r': o->resume = true; return RUN_GO;
    case 'O': o->overwrite = true; return RUN_GO;
    case 'h': usage(stdout); return 0;
    default: usage(stderr); return 2;
    }
}

/* The options and the one CONFIG argument, then the chaos spec. RUN_GO, or the exit code (0
 * after --help, 2 for a usage error, 1 when out of memory before anything was parsed). */
static int run_parse(int argc, char **argv, run_opts *o) {
    static const struct option longopts[] = {{"workers", required_argument, 0, 'w'},
                                             {"set", required_argument, 0, 's'},
                                             {"threads", required_argument, 0, 't'},
                                             {"chaos", required_argument, 0, 'c'},
                                             {"chaos-seed", required_argument, 0, 'S'},
                                             {"quiet", no_argument, 0, 'q'},
                                             {"resume", no_argument, 0, 'r'},
                                             {"overwrite", no_argument, 0, 'O'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    if (!(o->sets = calloc((size_t)argc + 1, sizeof(char *)))) return 1;
    optind = 1;
    int c, rc;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1)
        if ((rc = run_option(c, o)) != RUN_GO) return rc;
    if (o->resume && o->overwrite) {
        fprintf(stderr, "switchyard run: --resume and --overwrite exclude each other\n");
        return 2;
    }
    if (optind != argc - 1) {
        fprintf(stderr, "switchyard run: expected exactly one CONFIG file\n");
        usage(stderr);
        return 2;
    }
    o->config_path = argv[optind];
    if (o->chaos_text) {
        if (!(o->chaos = calloc(1, sizeof *o->chaos))) return 2;
        o->chaos->respawn_delay_s = SY_CHAOS_DEFAULT_RESPAWN_DELAY_S;
        o->chaos->restart_delay_s = SY_CHAOS_DEFAULT_RESTART_DELAY_S;
        o->chaos->cont_after_s = -1;
        if (chaos_parse(o->chaos_text, o->chaos) != SY_OK) {
            fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
            return 2;
        }
    }
    return RUN_GO;
}

/* The workers of a local cluster read the same files: the data is checked here, so that a wrong
 * path is one clear error instead of a run that fails in every generation. Local shards are
 * validated in full (mapping is cheap); s3:// ones only listed (each worker downloads and
 * validates them itself). */
static sy_status check_train_data(const sy_config_t *cfg) {
    bool remote = false;
    for (int i = 0; i < cfg->data.train.n; i++) remote |= sy_data_is_s3(cfg->data.train.items[i]);
    sy_data_t *d = NULL;
    sy_status ds = remote ? sy_data_check_patterns((const char *const *)cfg->data.train.items, cfg->data.train.n)
                          : sy_data_open((const char *const *)cfg->data.train.items, cfg->data.train.n,
                                         cfg->model.vocab_size, cfg->model.seq_len, &d);
    sy_data_destroy(&d);
    return ds;
}

/* The config (file, then --set, then validation) and what must hold before any process starts:
 * the memory plan, the training data, the CURVE keys, enough workers. Also settles --threads.
 * RUN_GO or the exit code (2 for a bad config, 1 for a plan or data that cannot work). */
static int run_configure(run_opts *o, sy_config_t *cfg) {
    if (sy_config_defaults(cfg) != SY_OK || sy_config_load(cfg, o->config_path) != SY_OK) goto cfg_fail;
    for (int i = 0; i < o->n_sets; i++)
        if (sy_config_set(cfg, o->sets[i]) != SY_OK) goto cfg_fail;
    if (sy_config_validate_from(cfg, o->config_path, o->sets, o->n_sets) != SY_OK) goto cfg_fail;
    if (strcmp(cfg->cluster.backend, "cuda") == 0) {
        /* one GPU per worker process, device k for worker k */
        char why[256];
        int ngpu = sy_backend_cuda_devices(why, sizeof why);
        if (ngpu <= 0) {
            fprintf(stderr,
                    "switchyard run: cluster.backend is cuda but no CUDA device can be used here: %s; run on a "
                    "machine with NVIDIA GPUs, or set cluster.backend: cpu (--set cluster.backend=cpu)\n",
                    why);
            return 1;
        }
        /* a test hook (tests/gpu/device_check.sh: W = 2 over tcp on one GPU): workers share the
         * GPUs round-robin; never with nccl, which cannot hold two ranks on one device */
        const char *share = getenv("SY_CUDA_SHARE_GPU");
        if (o->n_workers > ngpu && share && !strcmp(share, "1") && strcmp(sy_config_comm(cfg), "nccl") != 0) {
            fprintf(stderr, "switchyard run: SY_CUDA_SHARE_GPU=1: %d workers share %d GPU(s) (testing only)\n",
                    o->n_workers, ngpu);
            g_ngpu_shared = ngpu;
        } else if (o->n_workers > ngpu) {
            fprintf(stderr,
                    "switchyard run: --workers %d but only %d CUDA device(s) are visible (each worker needs its "
                    "own GPU): use --workers %d or fewer\n",
                    o->n_workers, ngpu, ngpu);
            return 2;
        }
    }
    if (strcmp(sy_config_comm(cfg), "nccl") == 0 && o->n_workers > 1) {
        char why[1024];
        if (sy_comm_nccl_available(why, sizeof why) <= 0) {
            fprintf(stderr,
                    "switchyard run: cluster.comm is nccl (cluster.comm: auto with cluster.backend: cuda means "
                    "nccl) but the nccl data plane cannot run here: %s; set cluster.comm: tcp "
                    "(--set cluster.comm=tcp)\n", why);
            return 1;
        }
    }
    if (sy_memplan_check_world(cfg, o->n_workers, o->n_workers) != SY_OK) {
        fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
        return 1;
    }
    if (check_train_data(cfg) != SY_OK) {
        fprintf(stderr, "switchyard run: data.train: %s\n", sy_err_msg());
        return 1;
    }
    /* validation (train.eval_every) reads data.val in every worker: a pattern that matches
     * nothing is the same kind of mistake */
    if (cfg->train.eval_every > 0 && cfg->data.val.n > 0 &&
        sy_data_check_patterns((const char *const *)cfg->data.val.items, cfg->data.val.n) != SY_OK) {
        fprintf(stderr, "switchyard run: data.val (set data.val= or train.eval_every=0 for no validation): %s\n",
                sy_err_msg());
        return 1;
    }
    if (check_curve(cfg) != SY_OK) {
        fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
        return 2;
    }
    if (o->n_workers < cfg->cluster.min_workers) {
        fprintf(stderr, "switchyard run: --workers %d is below cluster.min_workers = %d\n", o->n_workers,
                cfg->cluster.min_workers);
        return 2;
    }
    if (o->threads == 0) {
        int cores = sy_cpu_count(); /* what its workers may use (affinity), as they check */
        o->threads = cores / o->n_workers;
        if (o->threads < 1) o->threads = 1;
    }
    return RUN_GO;
cfg_fail:
    fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
    return 2;
}

/* switchyard-coordinator and switchyard-worker, next to this executable. */
static bool find_binaries(char *coord_bin, size_t cn, char *worker_bin, size_t wn) {
    char self[PATH_MAX], dir[PATH_MAX];
    ssize_t sl = readlink("/proc/self/exe", self, sizeof self - 1);
    if (sl <= 0) {
        fprintf(stderr, "switchyard run: cannot find my own executable\n");
        return false;
    }
    self[sl] = 0;
    snprintf(dir, sizeof dir, "%s", self);
    snprintf(coord_bin, cn, "%s/switchyard-coordinator", dirname(dir));
    snprintf(dir, sizeof dir, "%s", self);
    snprintf(worker_bin, wn, "%s/switchyard-worker", dirname(dir));
    if (access(coord_bin, X_OK) != 0 || access(worker_bin, X_OK) != 0) {
        fprintf(stderr, "switchyard run: %s and %s must be installed next to switchyard\n", coord_bin, worker_bin);
        return false;
    }
    return true;
}

/* The token of the mutating endpoints: the user's (status.token, status.token_file or
 * SY_STATUS_TOKEN), or a fresh random one. It reaches the coordinator through a 0600 file in the
 * run's 0700 folder (make_secrets), never its command line. False (message printed) on error. */
static bool make_token(lctx *L, const sy_config_t *cfg) {
    sy_status s = sy_secret_status_token(cfg->status.token, cfg->status.token_file, L->token, sizeof L->token);
    if (s == SY_OK && !L->token[0]) s = sy_secret_random_hex(L->token, 16);
    if (s != SY_OK) fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
    return s == SY_OK;
}

/* A fresh run: refused if the store holds committed checkpoints of this run name (they would be
 * continued by the coordinator, or mixed with this run's); --overwrite moves them aside first.
 * The coordinator then claims the run for itself (ckpt_run.h). */
static bool claim_fresh_run(const sy_config_t *cfg, bool overwrite) {
    sy_store_t *st = NULL;
    char writer[SY_RUN_WRITER_HEX + 1];
    sy_status ss = sy_store_open_config(cfg, &st);
    if (ss == SY_OK)
        ss = sy_run_claim(st, cfg->run.name, overwrite ? SY_RUN_OVERWRITE : SY_RUN_FRESH, writer, NULL, 0);
    sy_store_destroy(&st);
    if (ss != SY_OK) fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
    return ss == SY_OK;
}

/* Opens RUN.state_dir/chaos.jsonl and records the spec and the seed (drawn unless given). */
static bool chaos_log_start(lctx *L, run_opts *o, const sy_config_t *cfg) {
    char cpath[PATH_MAX + 64];
    snprintf(cpath, sizeof cpath, "%s/chaos.jsonl", cfg->run.state_dir);
    if (!(L->chaos_f = sy_fs_fopen_regular(cpath, 0))) {
        fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
        return false;
    }
    if (!o->have_seed && getrandom(&o->seed, sizeof o->seed, 0) != (ssize_t)sizeof o->seed)
        o->seed = (uint64_t)(sy_wall_s() * 1e6) ^ (uint64_t)getpid();
    L->rng = o->seed;
    char sd[24];
    snprintf(sd, sizeof sd, "%" PRIu64, o->seed); /* a string: JSON readers may not hold 64 bits */
    json_t *e = json_pack("{s:s, s:s, s:s, s:f}", "event", "chaos_start", "spec", o->chaos_text, "seed", sd, "time",
                          sy_wall_s());
    char *line = e ? json_dumps(e, JSON_COMPACT) : NULL;
    if (line) fprintf(L->chaos_f, "%s\n", line);
    fflush(L->chaos_f);
    free(line);
    json_decref(e);
    fprintf(stderr, "switchyard run: chaos '%s', seed %" PRIu64 "\n", o->chaos_text, o->seed);
    return true;
}

/* Paths that live as long as the command (lctx points into them). */
typedef struct {
    char coord_bin[PATH_MAX + 32], worker_bin[PATH_MAX + 32];
    char metrics[PATH_MAX + 64]; /* RUN.state_dir/metrics.jsonl */
} run_paths;

/* Everything before the first process: the launcher context (binaries, logs, flags), the status
 * token, libcurl, the run's claim and the chaos log. False (message printed) on failure. */
static bool run_prepare(lctx *L, run_opts *o, const sy_config_t *cfg, run_paths *p) {
    if (!find_binaries(p->coord_bin, sizeof p->coord_bin, p->worker_bin, sizeof p->worker_bin)) return false;
    L->coord_bin = p->coord_bin;
    L->worker_bin = p->worker_bin;
    L->config_path = o->config_path;
    /* the token goes by file (make_secrets): the coordinator's command line never holds it */
    L->sets = o->sets;
    L->n_sets = 0;
    for (int i = 0; i < o->n_sets; i++) {
        if (!strncmp(o->sets[i], "status.token=", 13) && o->sets[i][13])
            note(L, "warning: --set status.token=... is visible to every local user in this command line (ps); "
                    "use status.token_file (mode 0600) or the environment variable " SY_STATUS_TOKEN_ENV);
        if (strncmp(o->sets[i], "status.token=", 13) != 0 && strncmp(o->sets[i], "status.token_file=", 18) != 0)
            o->sets[L->n_sets++] = o->sets[i];
    }
    L->quiet = o->quiet;
    L->tty = isatty(STDERR_FILENO);
    L->threads = o->threads;
    L->comm = sy_config_comm(cfg);
    L->cuda = strcmp(cfg->cluster.backend, "cuda") == 0;
    if (cfg->cluster.curve_server_key[0]) {
        L->curve_pub = cfg->cluster.curve_server_public;
        L->curve_key = cfg->cluster.curve_worker_key;
    }
    snprintf(L->logdir, sizeof L->logdir, "%s/logs", cfg->run.state_dir);
    if (sy_mkdir_p(L->logdir) != SY_OK) {
        fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
        return false;
    }
    snprintf(p->metrics, sizeof p->metrics, "%s/metrics.jsonl", cfg->run.state_dir);
    snprintf(L->coord_log, sizeof L->coord_log, "%s/coordinator.log", L->logdir);
    if (!make_token(L, cfg)) return false;
    if (cfg->status.tls_cert && cfg->status.tls_cert[0])
        L->tls_ca = cfg->status.tls_ca && cfg->status.tls_ca[0] ? cfg->status.tls_ca : cfg->status.tls_cert;
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "switchyard run: cannot initialise libcurl\n");
        return false;
    }
    L->curl_ready = true;
    if (!o->resume && !claim_fresh_run(cfg, o->overwrite)) return false;
    if (o->chaos && !chaos_log_start(L, o, cfg)) return false;
    return true;
}

/* One more --set for the coordinator; false if it does not fit. */
static bool sec_set(lctx *L, const char *field, const char *path) {
    if (L->n_sec_sets == (int)(sizeof L->sec_sets / sizeof L->sec_sets[0])) return false;
    size_t cap = sizeof L->sec_sets[0];
    return (size_t)snprintf(L->sec_sets[L->n_sec_sets++], cap, "%s=%s", field, path) < cap;
}

/* The run's 0700 folder under $TMPDIR (else /tmp): the status token (status.token, 0600) and,
 * unless the config has CURVE keys or says cluster.insecure, a per-run CurveZMQ set: the
 * coordinator's and the workers' key pairs and the authorized-keys file, so that a local run
 * is authenticated by default. Removed by remove_secrets at the end, however the run ends.
 * False (message printed) on failure. */
static bool make_secrets(lctx *L, const sy_config_t *cfg) {
    const char *tmp = getenv("TMPDIR");
    if (!tmp || !*tmp) tmp = "/tmp";
    if ((size_t)snprintf(L->secdir, sizeof L->secdir, "%s/switchyard-run-XXXXXX", tmp) >= sizeof L->secdir - 64 ||
        !mkdtemp(L->secdir)) { /* mkdtemp makes it 0700 */
        fprintf(stderr, "switchyard run: cannot make a private folder under %s: %s\n", tmp, strerror(errno));
        L->secdir[0] = 0;
        return false;
    }
    char path[PATH_MAX + 32];
    sy_status s = SY_OK;
    snprintf(path, sizeof path, "%s/status.token", L->secdir);
    s = sy_fs_write_atomic(path, L->token, strlen(L->token), 0600, SY_FS_NO_REPLACE | SY_FS_EXACT_MODE);
    /* "status.token=" (empty) overrides a token in the YAML file: the file is the one source */
    if (s == SY_OK && !(sec_set(L, "status.token", "") && sec_set(L, "status.token_file", path)))
        s = sy_err_set(SY_EINVAL, "%s: path too long", L->secdir);
    if (s == SY_OK && !cfg->cluster.insecure && !cfg->cluster.curve_server_key[0]) {
        char ck[PATH_MAX + 32], cp[PATH_MAX + 32], wk[PATH_MAX + 32], wp[PATH_MAX + 32], ak[PATH_MAX + 32];
        snprintf(path, sizeof path, "%s/coordinator", L->secdir);
        s = sy_curve_keygen(path, ck, cp, sizeof ck);
        snprintf(path, sizeof path, "%s/worker", L->secdir);
        if (s == SY_OK) s = sy_curve_keygen(path, wk, wp, sizeof wk);
        sy_curve_key wpub;
        if (s == SY_OK) s = sy_curve_load_key(wp, false, &wpub);
        snprintf(ak, sizeof ak, "%s/authorized_workers", L->secdir);
        if (s == SY_OK) {
            char line[128];
            int n = snprintf(line, sizeof line, "%s switchyard run: the workers of this run\n", wpub.public_z85);
            s = sy_fs_write_atomic(ak, line, (size_t)n, 0600, SY_FS_NO_REPLACE | SY_FS_EXACT_MODE);
        }
        if (s == SY_OK && !(sec_set(L, "cluster.curve_server_key", ck) && sec_set(L, "cluster.curve_server_public", cp) &&
                            sec_set(L, "cluster.curve_worker_key", wk) && sec_set(L, "cluster.curve_authorized_keys", ak)))
            s = sy_err_set(SY_EINVAL, "%s: path too long", L->secdir);
        if (s == SY_OK) {
            snprintf(L->run_pub, sizeof L->run_pub, "%s", cp);
            snprintf(L->run_key, sizeof L->run_key, "%s", wk);
            L->curve_pub = L->run_pub;
            L->curve_key = L->run_key;
        }
    }
    if (s != SY_OK) fprintf(stderr, "switchyard run: per-run secrets in %s: %s\n", L->secdir, sy_err_msg());
    return s == SY_OK;
}

/* Removes the run's private folder and everything in it (plain files only: the keys, the
 * token, a temp file left by an interrupted write). */
static void remove_secrets(lctx *L) {
    if (!L->secdir[0]) return;
    DIR *d = opendir(L->secdir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL)
            if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) unlinkat(dirfd(d), e->d_name, 0);
        closedir(d);
    }
    if (rmdir(L->secdir) != 0 && errno != ENOENT)
        fprintf(stderr, "switchyard run: cannot remove %s: %s\n", L->secdir, strerror(errno));
    L->secdir[0] = 0;
}

static void install_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = l_on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL); /* a closed terminal stops the run cleanly (and removes its keys) */
    struct sigaction sc;
    memset(&sc, 0, sizeof sc);
    sc.sa_handler = l_on_child;
    sc.sa_flags = SA_NOCLDSTOP; /* no SA_RESTART: an exit cuts the tick's sleep short */
    sigaction(SIGCHLD, &sc, NULL);
}

/* The coordinator, then the workers. False (message printed) if one did not start. */
static bool start_cluster(lctx *L, int n_workers) {
    if (!start_coordinator(L, n_workers, false)) {
        fprintf(stderr, "switchyard run: the coordinator did not start\n");
        print_tail(L->coord_log, 20);
        return false;
    }
    if (!L->quiet)
        fprintf(stderr, "switchyard run: coordinator at %s, status %s; %d workers; logs in %s\n", L->bind,
                L->status, n_workers, L->logdir);
    for (int i = 0; i < n_workers; i++) {
        int k = add_worker(L);
        if (k < 0 || !spawn_worker(L, k)) {
            fprintf(stderr, "switchyard run: cannot start worker %d\n", i);
            return false;
        }
    }
    return true;
}

/* ---------------------------------------------------------------------------------------- */
/* Supervision: one tick every SY_LAUNCH_TICK_MS until the coordinator exits                 */

typedef struct {
    ch_spec *chaos;       /* NULL: no chaos */
    const char *metrics_path;
    int64_t steps;        /* run.steps, for the ETA */
    long moff;            /* bytes of metrics.jsonl already read */
    int coord_status;     /* waitpid status of the coordinator; -1: none (it could not be restarted) */
    int64_t last_step, first_step, shown_step;
    double first_t, loss, tps;
    int world, gen;
    double stop_sent, restart_at, all_gone_at; /* launcher clock; 0: not yet / none */
    bool coord_killed, gave_up;
} run_state;

/* The coordinator's exit: ends the run, unless the chaos killed it (then it is restarted after
 * restart_delay_s on the same ports). False when supervision ends. */
static bool tick_coordinator(lctx *L, run_state *S) {
    int st;
    double now = sy_mono_s();
    if (L->coord > 0 && waitpid(L->coord, &st, WNOHANG) == L->coord) {
        L->coord = -1;
        if (S->coord_killed && !l_interrupted && S->stop_sent == 0) {
            S->coord_killed = false;
            S->restart_at = now + (S->chaos ? S->chaos->restart_delay_s : 0);
        } else {
            S->coord_status = st;
            return false;
        }
    }
    if (S->restart_at > 0 && now >= S->restart_at) {
        S->restart_at = 0;
        int expect = live_workers(L, false);
        if (!start_coordinator(L, expect > 0 ? expect : 1, true)) {
            note(L, "the coordinator could not be restarted");
            if (L->coord > 0) {
                kill(L->coord, SIGKILL);
                waitpid(L->coord, NULL, 0);
                L->coord = -1;
            }
            S->coord_status = -1;
            return false;
        }
        chaos_event(L, "restart-coordinator", "coordinator", L->coord, S->last_step);
    }
    return true;
}

/* Workers that exited: reported to the coordinator at once (unless the run is stopping), and
 * scheduled for respawn when the chaos asks for it. */
static void reap_workers(lctx *L, run_state *S) {
    for (int i = 0; i < L->nw; i++) {
        wproc *w = &L->w[i];
        int st;
        if (w->pid <= 0 || waitpid(w->pid, &st, WNOHANG) != w->pid) continue;
        pid_t was = w->pid;
        w->pid = -1;
        w->stopped = false;
        w->cont_at = 0;
        bool clean = WIFEXITED(st) && WEXITSTATUS(st) == 0;
        if (!L->quiet || !clean)
            note(L, "worker %s exited (%s %d)", w->id, WIFEXITED(st) ? "status" : "signal",
                 WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
        if (!clean && S->stop_sent == 0) {
            report_lost(L, w->id, was);
            if (S->chaos && S->chaos->respawn != RESPAWN_NONE) w->respawn_at = sy_mono_s() + S->chaos->respawn_delay_s;
        }
        /* After a clean exit (Stop) the coordinator is expected to end on its own; after a
         * crash it gets a moment to record the losses before it is stopped. */
        if (live_workers(L, true) == 0) S->all_gone_at = sy_mono_s() + (clean ? SY_LAUNCH_GRACE_MS / 1e3 : 1.0);
    }
}

/* Chaos follow-ups that are due: SIGCONT to stopped workers, respawns (same slot or a new one). */
static void revive_workers(lctx *L, run_state *S, double now) {
    for (int i = 0; i < L->nw && S->stop_sent == 0; i++) {
        wproc *w = &L->w[i];
        if (w->stopped && w->cont_at > 0 && now >= w->cont_at && w->pid > 0) {
            kill(w->pid, SIGCONT);
            w->stopped = false;
            w->cont_at = 0;
            chaos_event(L, "cont-worker", w->id, w->pid, S->last_step);
        }
        if (w->respawn_at > 0 && now >= w->respawn_at) {
            w->respawn_at = 0;
            int k = i;
            if (S->chaos->respawn == RESPAWN_NEW) {
                k = add_worker(L); /* may move L->w */
                if (k < 0) continue;
                w = &L->w[i];
                L->w[k].device = w->device; /* its replacement runs on its GPU */
            }
            if (spawn_worker(L, k)) {
                S->all_gone_at = 0;
                chaos_event(L, "respawn-worker", L->w[k].id, L->w[k].pid, S->last_step);
            }
        }
    }
}

/* Every worker gone and none coming back: the run cannot go on, the coordinator is stopped.
 * False when supervision ends (no coordinator left to wait for). */
static bool give_up_if_all_gone(lctx *L, run_state *S, double now) {
    if (S->all_gone_at > 0 && live_workers(L, true) > 0) S->all_gone_at = 0;
    if (!(S->all_gone_at > 0 && now >= S->all_gone_at && S->stop_sent == 0)) return true;
    bool pending = false;
    for (int i = 0; i < L->nw; i++) pending |= L->w[i].respawn_at > 0;
    if (pending) return true;
    note(L, "every worker has exited and none will be respawned: stopping the coordinator");
    S->gave_up = true;
    if (L->coord > 0) kill(L->coord, SIGTERM);
    S->stop_sent = now;
    S->restart_at = 0;
    return L->coord > 0;
}

/* Ctrl-C (or SIGTERM): the coordinator is asked to stop, then killed after the grace period. */
static void handle_stop(lctx *L, run_state *S) {
    if (l_interrupted && S->stop_sent == 0) {
        if (!L->quiet) note(L, "stopping...");
        if (L->coord > 0) kill(L->coord, SIGTERM);
        S->stop_sent = sy_mono_s();
    }
    if (S->stop_sent > 0 && L->coord > 0 && (sy_mono_s() - S->stop_sent) * 1e3 > SY_LAUNCH_GRACE_MS)
        kill(L->coord, SIGKILL);
}

/* New complete lines of metrics.jsonl: the latest step, loss, throughput, world and generation. */
static void read_metrics(run_state *S) {
    FILE *mf = fopen(S->metrics_path, "r");
    if (!mf) return;
    struct stat sb;
    if (fstat(fileno(mf), &sb) == 0 && sb.st_size < S->moff) S->moff = 0; /* a fresh coordinator truncated it */
    fseek(mf, S->moff, SEEK_SET);
    char *ml = NULL;
    size_t mcap = 0;
    ssize_t n;
    while ((n = getline(&ml, &mcap, mf)) > 0) {
        if (ml[n - 1] != '\n') break; /* partial line: read it next time */
        S->moff += n;
        json_t *j = json_loads(ml, 0, NULL);
        if (!j) continue;
        S->last_step = json_integer_value(json_object_get(j, "step"));
        S->loss = json_number_value(json_object_get(j, "loss"));
        S->tps = json_number_value(json_object_get(j, "tokens_per_s"));
        S->world = (int)json_integer_value(json_object_get(j, "world"));
        S->gen = (int)json_integer_value(json_object_get(j, "generation"));
        if (S->first_step < 0) S->first_step = S->last_step, S->first_t = sy_mono_s();
        json_decref(j);
    }
    free(ml);
    fclose(mf);
}

/* Fires the chaos items that are due (once the first step is in, never while stopping). */
static void run_chaos(lctx *L, run_state *S) {
    ch_spec *chaos = S->chaos;
    if (!chaos || S->first_step < 0 || S->stop_sent != 0) return;
    double now = sy_mono_s();
    for (int k = 0; k < chaos->n; k++) {
        ch_item *it = &chaos->items[k];
        if (it->done) continue;
        if (it->action == CH_KILL_COORD && (L->coord <= 0 || S->restart_at > 0)) continue;
        if (it->trigger != TR_STEP && it->next_s == 0) it->next_s = S->first_t + it->period_s;
        bool due = it->trigger == TR_STEP ? S->last_step >= it->step : now >= it->next_s;
        if (!due) continue;
        chaos_fire(L, it, S->last_step, &S->coord_killed);
        if (it->trigger == TR_EVERY) {
            while (it->next_s <= now) it->next_s += it->period_s;
        } else {
            it->done = true;
        }
        if (it->action == CH_STOP_WORKER && chaos->cont_after_s >= 0)
            for (int i = 0; i < L->nw; i++)
                if (L->w[i].stopped && L->w[i].cont_at == 0) L->w[i].cont_at = now + chaos->cont_after_s;
    }
}

/* The progress line, rewritten in place on a terminal. */
static void show_progress(lctx *L, run_state *S) {
    if (L->quiet || S->last_step <= 0 || S->last_step == S->shown_step) return;
    S->shown_step = S->last_step;
    char eta[32];
    double el = sy_mono_s() - S->first_t;
    double rate = S->last_step > S->first_step ? (S->last_step - S->first_step) / el : 0;
    sy_log_fmt_duration(eta, sizeof eta, rate > 0 ? (S->steps - S->last_step) / rate : NAN);
    fprintf(stderr, "%sstep %lld/%lld | loss %.4f | %.1fk tok/s | workers %d | gen %d | ETA %s%s",
            L->tty ? "\r" : "", (long long)S->last_step, (long long)S->steps, S->loss, S->tps / 1e3, S->world,
            S->gen, eta, L->tty ? "\033[K" : "\n");
    L->line_open = L->tty;
}

/* Progress until the coordinator exits (a chaos kill of it restarts it instead). */
static void supervise(lctx *L, run_state *S) {
    for (;;) {
        if (!tick_coordinator(L, S)) break;
        if (l_interrupted && L->coord <= 0) break; /* Ctrl-C while the coordinator is down */
        reap_workers(L, S);
        double now = sy_mono_s();
        revive_workers(L, S, now);
        if (!give_up_if_all_gone(L, S, now)) break;
        handle_stop(L, S);
        read_metrics(S);
        run_chaos(L, S);
        show_progress(L, S);
        usleep(SY_LAUNCH_TICK_MS * 1000); /* cut short by SIGCHLD */
    }
    if (L->line_open) fputc('\n', stderr);
    L->line_open = false;
}

/* The exit code once supervision ended: 0 only if the coordinator exited 0, nobody interrupted
 * or gave up, and the final checkpoint reads back from the store ("completed" means that). */
static int run_outcome(lctx *L, const run_state *S, const sy_config_t *cfg) {
    int cs = S->coord_status;
    bool coord_ok = cs != -1 && WIFEXITED(cs) && WEXITSTATUS(cs) == 0;
    if (!coord_ok || l_interrupted || S->gave_up) {
        if (cs == -1)
            fprintf(stderr, "switchyard run: the run %s\n", l_interrupted ? "was interrupted" : "failed");
        else
            fprintf(stderr, "switchyard run: the run %s (coordinator %s %d)\n",
                    l_interrupted ? "was interrupted" : "failed", WIFEXITED(cs) ? "exit status" : "signal",
                    WIFEXITED(cs) ? WEXITSTATUS(cs) : WTERMSIG(cs));
        if (!l_interrupted) print_tail(L->coord_log, 20);
        return 1;
    }
    sy_store_t *st = NULL;
    sy_status vs = sy_store_open_config(cfg, &st);
    if (vs == SY_OK) vs = sy_run_verify_checkpoint(st, cfg->run.name, cfg->run.steps, NULL);
    sy_store_destroy(&st);
    if (vs != SY_OK) {
        fprintf(stderr, "switchyard run: the coordinator reported success, but %s\n", sy_err_msg());
        return 1;
    }
    if (!L->quiet)
        fprintf(stderr, "switchyard run: run %s completed %lld steps; metrics in %s\n", cfg->run.name,
                (long long)cfg->run.steps, S->metrics_path);
    return 0;
}

/* Stops whatever still runs: the coordinator (SIGTERM, SIGKILL after the grace period), then the
 * workers, which exit on the coordinator's Stop: a grace period, SIGTERM after 2 s, SIGKILL. */
static void stop_all(lctx *L) {
    if (L->coord > 0) {
        kill(L->coord, SIGTERM);
        double ts = sy_mono_s();
        while (waitpid(L->coord, NULL, WNOHANG) != L->coord) {
            if ((sy_mono_s() - ts) * 1e3 > SY_LAUNCH_GRACE_MS) {
                kill(L->coord, SIGKILL);
                waitpid(L->coord, NULL, 0);
                break;
            }
            usleep(50 * 1000);
        }
        L->coord = -1;
    }
    if (!L->w) return;
    double ts = sy_mono_s();
    bool any = true, termed = false;
    while (any && (sy_mono_s() - ts) * 1e3 < SY_LAUNCH_GRACE_MS) {
        any = false;
        for (int i = 0; i < L->nw; i++) {
            if (L->w[i].pid <= 0) continue;
            if (waitpid(L->w[i].pid, NULL, WNOHANG) == L->w[i].pid) L->w[i].pid = -1;
            else any = true;
        }
        if (any && !termed && (sy_mono_s() - ts) > 2.0) {
            termed = true;
            for (int i = 0; i < L->nw; i++)
                if (L->w[i].pid > 0) {
                    kill(L->w[i].pid, SIGTERM);
                    if (L->w[i].stopped) kill(L->w[i].pid, SIGCONT);
                }
        }
        if (any) usleep(50 * 1000);
    }
    for (int i = 0; i < L->nw; i++)
        if (L->w[i].pid > 0) {
            kill(L->w[i].pid, SIGKILL);
            waitpid(L->w[i].pid, NULL, 0);
        }
}

/* ---------------------------------------------------------------------------------------- */
/* The command                                                                               */

int sy_run_cli(int argc, char **argv) {
    run_opts o = {.n_workers = 2};
    sy_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    lctx L;
    memset(&L, 0, sizeof L);
    L.coord = -1;
    L.coord_fd = -1;
    run_paths paths;
    int rc = run_parse(argc, argv, &o);
    if (rc == RUN_GO) rc = run_configure(&o, &cfg);
    if (rc == RUN_GO) {
        rc = 1;
        sy_log_set_role("run");
        if (run_prepare(&L, &o, &cfg, &paths)) {
            install_signals();
            if (make_secrets(&L, &cfg) && start_cluster(&L, o.n_workers)) {
                run_state S = {.chaos = o.chaos, .metrics_path = paths.metrics, .steps = cfg.run.steps,
                               .coord_status = -1, .first_step = -1, .loss = NAN};
                supervise(&L, &S);
                rc = run_outcome(&L, &S, &cfg);
            }
            stop_all(&L);
        }
    }
    remove_secrets(&L);
    explicit_bzero(L.token, sizeof L.token);
    if (L.coord_fd >= 0) close(L.coord_fd);
    if (L.chaos_f) fclose(L.chaos_f);
    if (L.curl_ready) curl_global_cleanup();
    free(L.w);
    free(o.chaos);
    free(o.chaos_text);
    free(o.sets);
    sy_config_free(&cfg);
    return rc;
}
