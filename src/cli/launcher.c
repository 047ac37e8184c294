#include "cli/launcher.h"
#include "base/clock.h"

#include <curl/curl.h>
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
#include "data/data.h"
#include "data/data_s3.h"
#include "base/fsutil.h"
#include "backend/cpu_setup.h"
#include "base/log.h"
#include "model/memplan.h"
#include "storage/store.h"
#include "storage/store_s3.h"

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
            "/v1/workers/ID/lost with status.token; the launcher makes a random token when the\n"
            "config sets none). When every worker has exited and none will be respawned, the\n"
            "launcher stops the coordinator and exits 1.\n"
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
} wproc;

typedef struct {
    const char *coord_bin, *worker_bin, *config_path;
    char logdir[PATH_MAX];
    char coord_log[PATH_MAX + 64];
    char **sets;
    int n_sets;
    char token_set[128]; /* "status.token=..." when the launcher made the token, else "" */
    char token[96];
    bool quiet, tty;
    bool line_open;      /* a progress line without its newline is on the terminal */
    int threads;
    const char *curve_pub, *curve_key; /* the workers' CURVE flags (NULL: plaintext) */
    const char *comm;                  /* the workers' data plane (cluster.comm) */
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
    char **cargv = calloc((size_t)(2 * L->n_sets + 16), sizeof(char *));
    if (!cargv) return false;
    char exp[16], status_addr[512];
    snprintf(exp, sizeof exp, "%d", expect);
    int ca = 0;
    cargv[ca++] = (char *)L->coord_bin;
    cargv[ca++] = (char *)L->config_path;
    for (int i = 0; i < L->n_sets; i++) cargv[ca++] = "--set", cargv[ca++] = L->sets[i];
    if (L->token_set[0]) cargv[ca++] = "--set", cargv[ca++] = L->token_set;
    cargv[ca++] = "--bind";
    if (restart) {
        const char *s = L->status;
        if (!strncmp(s, "http://", 7)) s += 7;
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
    char th[16], path[PATH_MAX + 64];
    snprintf(th, sizeof th, "%d", L->threads);
    char *wargv[] = {(char *)L->worker_bin, "--coordinator", L->bind, "--id", w->id, "--threads", th,
                     "--comm", (char *)L->comm, L->curve_key ? "--curve-server-public" : NULL, (char *)L->curve_pub, "--curve-key",
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
    CURLcode rc = curl_easy_perform(h);
    long code = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    if (rc != CURLE_OK) note(L, "could not report worker %s to the coordinator: %s", id, curl_easy_strerror(rc));
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

/* ---------------------------------------------------------------------------------------- */
/* The command                                                                               */

int sy_run_cli(int argc, char **argv) {
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
    int n_workers = 2, threads = 0, c, rc = 2;
    bool quiet = false, have_seed = false, resume = false, overwrite = false;
    uint64_t seed = 0;
    char **sets = calloc((size_t)argc + 1, sizeof(char *));
    int n_sets = 0;
    char *chaos_text = NULL;
    ch_spec *chaos = NULL;
    sy_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    lctx L;
    memset(&L, 0, sizeof L);
    L.coord = -1;
    L.coord_fd = -1;
    bool curl_ready = false;
    if (!sets) return 1;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'w': {
            char *end;
            long v = strtol(optarg, &end, 10);
            if (*end || v < 1 || v > 256) {
                fprintf(stderr, "switchyard run: --workers %s: expected an integer in [1, 256]\n", optarg);
                goto out;
            }
            n_workers = (int)v;
            break;
        }
        case 't': {
            char *end;
            long v = strtol(optarg, &end, 10);
            int cores = sy_cpu_count();
            if (!*optarg || *end || v < 1 || v > cores) {
                fprintf(stderr,
                        "switchyard run: --threads %s: expected an integer from 1 to %d (the cores this process may "
                        "use; each worker gets this many)\n",
                        optarg, cores);
                goto out;
            }
            threads = (int)v;
            break;
        }
        case 'c': {
            size_t have = chaos_text ? strlen(chaos_text) : 0;
            char *n = realloc(chaos_text, have + strlen(optarg) + 2);
            if (!n) goto out;
            if (have) n[have++] = ',';
            strcpy(n + have, optarg);
            chaos_text = n;
            break;
        }
        case 'S': {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(optarg, &end, 10);
            if (!*optarg || *end || errno || optarg[0] == '-') {
                fprintf(stderr, "switchyard run: --chaos-seed %s: expected a non-negative integer\n", optarg);
                goto out;
            }
            seed = v;
            have_seed = true;
            break;
        }
        case 's': sets[n_sets++] = optarg; break;
        case 'q': quiet = true; break;
        case 'r': resume = true; break;
        case 'O': overwrite = true; break;
        case 'h': usage(stdout); rc = 0; goto out;
        default: usage(stderr); goto out;
        }
    }
    if (resume && overwrite) {
        fprintf(stderr, "switchyard run: --resume and --overwrite exclude each other\n");
        goto out;
    }
    if (optind != argc - 1) {
        fprintf(stderr, "switchyard run: expected exactly one CONFIG file\n");
        usage(stderr);
        goto out;
    }
    if (chaos_text) {
        chaos = calloc(1, sizeof *chaos);
        if (!chaos) goto out;
        chaos->respawn_delay_s = SY_CHAOS_DEFAULT_RESPAWN_DELAY_S;
        chaos->restart_delay_s = SY_CHAOS_DEFAULT_RESTART_DELAY_S;
        chaos->cont_after_s = -1;
        if (chaos_parse(chaos_text, chaos) != SY_OK) {
            fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
            goto out;
        }
    }
    const char *config_path = argv[optind];
    if (sy_config_defaults(&cfg) != SY_OK || sy_config_load(&cfg, config_path) != SY_OK) goto cfg_fail;
    for (int i = 0; i < n_sets; i++)
        if (sy_config_set(&cfg, sets[i]) != SY_OK) goto cfg_fail;
    if (sy_config_validate_from(&cfg, config_path, sets, n_sets) != SY_OK) goto cfg_fail;
    if (sy_memplan_check(&cfg, n_workers) != SY_OK) {
        fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
        rc = 1;
        goto out;
    }
    {
        /* The workers of a local cluster read the same files: check the data here, so that a
         * wrong path is one clear error instead of a run that fails in every generation. Local
         * shards are validated in full (mapping is cheap); s3:// ones only listed (each worker
         * downloads and validates them itself). */
        bool remote = false;
        for (int i = 0; i < cfg.data.train.n; i++) remote |= sy_data_is_s3(cfg.data.train.items[i]);
        sy_data_t *d = NULL;
        sy_status ds = remote ? sy_data_check_patterns((const char *const *)cfg.data.train.items, cfg.data.train.n)
                              : sy_data_open((const char *const *)cfg.data.train.items, cfg.data.train.n,
                                             cfg.model.vocab_size, cfg.model.seq_len, &d);
        if (ds != SY_OK) {
            fprintf(stderr, "switchyard run: data.train: %s\n", sy_err_msg());
            rc = 1;
            goto out;
        }
        sy_data_destroy(&d);
    }
    if (check_curve(&cfg) != SY_OK) {
        fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
        goto out;
    }
    if (n_workers < cfg.cluster.min_workers) {
        fprintf(stderr, "switchyard run: --workers %d is below cluster.min_workers = %d\n", n_workers,
                cfg.cluster.min_workers);
        goto out;
    }
    if (threads == 0) {
        int cores = sy_cpu_count(); /* what its workers may use (affinity), as they check */
        threads = cores / n_workers;
        if (threads < 1) threads = 1;
    }
    rc = 1;
    sy_log_set_role("run");

    /* binaries next to this one */
    char self[PATH_MAX], dir[PATH_MAX], coord_bin[PATH_MAX + 32], worker_bin[PATH_MAX + 32];
    ssize_t sl = readlink("/proc/self/exe", self, sizeof self - 1);
    if (sl <= 0) {
        fprintf(stderr, "switchyard run: cannot find my own executable\n");
        goto out;
    }
    self[sl] = 0;
    snprintf(dir, sizeof dir, "%s", self);
    snprintf(coord_bin, sizeof coord_bin, "%s/switchyard-coordinator", dirname(dir));
    snprintf(dir, sizeof dir, "%s", self);
    snprintf(worker_bin, sizeof worker_bin, "%s/switchyard-worker", dirname(dir));
    if (access(coord_bin, X_OK) != 0 || access(worker_bin, X_OK) != 0) {
        fprintf(stderr, "switchyard run: %s and %s must be installed next to switchyard\n", coord_bin, worker_bin);
        goto out;
    }
    L.coord_bin = coord_bin;
    L.worker_bin = worker_bin;
    L.config_path = config_path;
    L.sets = sets;
    L.n_sets = n_sets;
    L.quiet = quiet;
    L.tty = isatty(STDERR_FILENO);
    L.threads = threads;
    L.comm = cfg.cluster.comm;
    if (cfg.cluster.curve_server_key[0]) {
        L.curve_pub = cfg.cluster.curve_server_public;
        L.curve_key = cfg.cluster.curve_worker_key;
    }
    char metrics_path[PATH_MAX + 64];
    snprintf(L.logdir, sizeof L.logdir, "%s/logs", cfg.run.state_dir);
    if (sy_mkdir_p(L.logdir) != SY_OK) {
        fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
        goto out;
    }
    snprintf(metrics_path, sizeof metrics_path, "%s/metrics.jsonl", cfg.run.state_dir);
    snprintf(L.coord_log, sizeof L.coord_log, "%s/coordinator.log", L.logdir);

    /* The token of the mutating endpoints: the user's, or a fresh random one. */
    if (cfg.status.token && cfg.status.token[0]) {
        snprintf(L.token, sizeof L.token, "%s", cfg.status.token);
    } else {
        uint8_t rb[16];
        if (getrandom(rb, sizeof rb, 0) != (ssize_t)sizeof rb) {
            uint64_t s = (uint64_t)(sy_wall_s() * 1e9) ^ ((uint64_t)getpid() << 32);
            for (size_t i = 0; i < sizeof rb; i++) rb[i] = (uint8_t)rng_next(&s);
        }
        for (size_t i = 0; i < sizeof rb; i++) snprintf(L.token + 2 * i, 3, "%02x", rb[i]);
        snprintf(L.token_set, sizeof L.token_set, "status.token=%s", L.token);
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "switchyard run: cannot initialise libcurl\n");
        goto out;
    }
    curl_ready = true;
    if (!resume) {
        /* A fresh run: refused if the store holds committed checkpoints of this run name (they
         * would be continued by the coordinator, or mixed with this run's); --overwrite moves
         * them aside first. The coordinator then claims the run for itself (ckpt_run.h). */
        sy_store_t *st = NULL;
        char writer[SY_RUN_WRITER_HEX + 1];
        sy_status ss = sy_store_open_config(&cfg, &st);
        if (ss == SY_OK)
            ss = sy_run_claim(st, cfg.run.name, overwrite ? SY_RUN_OVERWRITE : SY_RUN_FRESH, writer, NULL, 0);
        sy_store_destroy(&st);
        if (ss != SY_OK) {
            fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
            rc = 1;
            goto out;
        }
    }
    if (chaos) {
        char cpath[PATH_MAX + 64];
        snprintf(cpath, sizeof cpath, "%s/chaos.jsonl", cfg.run.state_dir);
        if (!(L.chaos_f = sy_fs_fopen_regular(cpath, 0))) {
            fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
            goto out;
        }
        if (!have_seed && getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed)
            seed = (uint64_t)(sy_wall_s() * 1e6) ^ (uint64_t)getpid();
        L.rng = seed;
        char sd[24];
        snprintf(sd, sizeof sd, "%" PRIu64, seed); /* a string: JSON readers may not hold 64 bits */
        json_t *e = json_pack("{s:s, s:s, s:s, s:f}", "event", "chaos_start", "spec", chaos_text, "seed", sd, "time",
                              sy_wall_s());
        char *line = e ? json_dumps(e, JSON_COMPACT) : NULL;
        if (line) fprintf(L.chaos_f, "%s\n", line);
        fflush(L.chaos_f);
        free(line);
        json_decref(e);
        fprintf(stderr, "switchyard run: chaos '%s', seed %" PRIu64 "\n", chaos_text, seed);
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = l_on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    struct sigaction sc;
    memset(&sc, 0, sizeof sc);
    sc.sa_handler = l_on_child;
    sc.sa_flags = SA_NOCLDSTOP; /* no SA_RESTART: an exit cuts the tick's sleep short */
    sigaction(SIGCHLD, &sc, NULL);

    /* coordinator */
    if (!start_coordinator(&L, n_workers, false)) {
        fprintf(stderr, "switchyard run: the coordinator did not start\n");
        print_tail(L.coord_log, 20);
        goto stop_all;
    }
    if (!quiet)
        fprintf(stderr, "switchyard run: coordinator at %s, status %s; %d workers; logs in %s\n", L.bind,
                L.status, n_workers, L.logdir);

    for (int i = 0; i < n_workers; i++) {
        int k = add_worker(&L);
        if (k < 0 || !spawn_worker(&L, k)) {
            fprintf(stderr, "switchyard run: cannot start worker %d\n", i);
            goto stop_all;
        }
    }

    /* progress until the coordinator exits (a chaos kill of it restarts it instead) */
    long moff = 0;
    int coord_status = -1;
    int64_t last_step = 0, first_step = -1, shown_step = 0;
    double first_t = 0, loss = NAN, tps = 0;
    int world = 0, gen = 0;
    double stop_sent = 0, restart_at = 0, all_gone_at = 0;
    bool coord_killed = false, gave_up = false;
    for (;;) {
        int st;
        double now = sy_mono_s();
        if (L.coord > 0 && waitpid(L.coord, &st, WNOHANG) == L.coord) {
            L.coord = -1;
            if (coord_killed && !l_interrupted && stop_sent == 0) {
                coord_killed = false;
                restart_at = now + (chaos ? chaos->restart_delay_s : 0);
            } else {
                coord_status = st;
                break;
            }
        }
        if (restart_at > 0 && now >= restart_at) {
            restart_at = 0;
            int expect = live_workers(&L, false);
            if (!start_coordinator(&L, expect > 0 ? expect : 1, true)) {
                note(&L, "the coordinator could not be restarted");
                if (L.coord > 0) {
                    kill(L.coord, SIGKILL);
                    waitpid(L.coord, NULL, 0);
                    L.coord = -1;
                }
                coord_status = -1;
                break;
            }
            chaos_event(&L, "restart-coordinator", "coordinator", L.coord, last_step);
        }
        if (l_interrupted && L.coord <= 0) break; /* Ctrl-C while the coordinator is down */
        /* workers: exits are reported to the coordinator at once */
        for (int i = 0; i < L.nw; i++) {
            wproc *w = &L.w[i];
            if (w->pid <= 0 || waitpid(w->pid, &st, WNOHANG) != w->pid) continue;
            pid_t was = w->pid;
            w->pid = -1;
            w->stopped = false;
            w->cont_at = 0;
            bool clean = WIFEXITED(st) && WEXITSTATUS(st) == 0;
            if (!quiet || !clean)
                note(&L, "worker %s exited (%s %d)", w->id, WIFEXITED(st) ? "status" : "signal",
                     WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
            if (!clean && stop_sent == 0) {
                report_lost(&L, w->id, was);
                if (chaos && chaos->respawn != RESPAWN_NONE) w->respawn_at = sy_mono_s() + chaos->respawn_delay_s;
            }
            /* After a clean exit (Stop) the coordinator is expected to end on its own; after a
             * crash it gets a moment to record the losses before it is stopped. */
            if (live_workers(&L, true) == 0) all_gone_at = sy_mono_s() + (clean ? SY_LAUNCH_GRACE_MS / 1e3 : 1.0);
        }
        now = sy_mono_s();
        for (int i = 0; i < L.nw && stop_sent == 0; i++) {
            wproc *w = &L.w[i];
            if (w->stopped && w->cont_at > 0 && now >= w->cont_at && w->pid > 0) {
                kill(w->pid, SIGCONT);
                w->stopped = false;
                w->cont_at = 0;
                chaos_event(&L, "cont-worker", w->id, w->pid, last_step);
            }
            if (w->respawn_at > 0 && now >= w->respawn_at) {
                w->respawn_at = 0;
                int k = i;
                if (chaos->respawn == RESPAWN_NEW) {
                    k = add_worker(&L); /* may move L.w */
                    if (k < 0) continue;
                    w = &L.w[i];
                }
                if (spawn_worker(&L, k)) {
                    all_gone_at = 0;
                    chaos_event(&L, "respawn-worker", L.w[k].id, L.w[k].pid, last_step);
                }
            }
        }
        /* every worker gone and none coming back: the run cannot go on */
        if (all_gone_at > 0 && live_workers(&L, true) > 0) all_gone_at = 0;
        if (all_gone_at > 0 && now >= all_gone_at && stop_sent == 0) {
            bool pending = false;
            for (int i = 0; i < L.nw; i++) pending |= L.w[i].respawn_at > 0;
            if (!pending) {
                note(&L, "every worker has exited and none will be respawned: stopping the coordinator");
                gave_up = true;
                if (L.coord > 0) kill(L.coord, SIGTERM);
                stop_sent = now;
                restart_at = 0;
                if (L.coord <= 0) break;
            }
        }
        if (l_interrupted && stop_sent == 0) {
            if (!quiet) note(&L, "stopping...");
            if (L.coord > 0) kill(L.coord, SIGTERM);
            stop_sent = sy_mono_s();
        }
        if (stop_sent > 0 && L.coord > 0 && (sy_mono_s() - stop_sent) * 1e3 > SY_LAUNCH_GRACE_MS) kill(L.coord, SIGKILL);
        /* new metrics lines */
        FILE *mf = fopen(metrics_path, "r");
        if (mf) {
            struct stat sb;
            if (fstat(fileno(mf), &sb) == 0 && sb.st_size < moff) moff = 0; /* a fresh coordinator truncated it */
            fseek(mf, moff, SEEK_SET);
            char *ml = NULL;
            size_t mcap = 0;
            ssize_t n;
            while ((n = getline(&ml, &mcap, mf)) > 0) {
                if (ml[n - 1] != '\n') break; /* partial line: read it next time */
                moff += n;
                json_t *j = json_loads(ml, 0, NULL);
                if (!j) continue;
                last_step = json_integer_value(json_object_get(j, "step"));
                loss = json_number_value(json_object_get(j, "loss"));
                tps = json_number_value(json_object_get(j, "tokens_per_s"));
                world = (int)json_integer_value(json_object_get(j, "world"));
                gen = (int)json_integer_value(json_object_get(j, "generation"));
                if (first_step < 0) first_step = last_step, first_t = sy_mono_s();
                json_decref(j);
            }
            free(ml);
            fclose(mf);
        }
        /* chaos */
        if (chaos && first_step >= 0 && stop_sent == 0) {
            now = sy_mono_s();
            for (int k = 0; k < chaos->n; k++) {
                ch_item *it = &chaos->items[k];
                if (it->done) continue;
                if (it->action == CH_KILL_COORD && (L.coord <= 0 || restart_at > 0)) continue;
                if (it->trigger != TR_STEP && it->next_s == 0) it->next_s = first_t + it->period_s;
                bool due = it->trigger == TR_STEP ? last_step >= it->step : now >= it->next_s;
                if (!due) continue;
                chaos_fire(&L, it, last_step, &coord_killed);
                if (it->trigger == TR_EVERY) {
                    while (it->next_s <= now) it->next_s += it->period_s;
                } else {
                    it->done = true;
                }
                if (it->action == CH_STOP_WORKER && chaos->cont_after_s >= 0)
                    for (int i = 0; i < L.nw; i++)
                        if (L.w[i].stopped && L.w[i].cont_at == 0) L.w[i].cont_at = now + chaos->cont_after_s;
            }
        }
        if (!quiet && last_step > 0 && last_step != shown_step) {
            shown_step = last_step;
            char eta[32];
            double el = sy_mono_s() - first_t;
            double rate = last_step > first_step ? (last_step - first_step) / el : 0;
            sy_log_fmt_duration(eta, sizeof eta, rate > 0 ? (cfg.run.steps - last_step) / rate : NAN);
            fprintf(stderr, "%sstep %lld/%lld | loss %.4f | %.1fk tok/s | workers %d | gen %d | ETA %s%s",
                    L.tty ? "\r" : "", (long long)last_step, (long long)cfg.run.steps, loss, tps / 1e3,
                    world, gen, eta, L.tty ? "\033[K" : "\n");
            L.line_open = L.tty;
        }
        usleep(SY_LAUNCH_TICK_MS * 1000); /* cut short by SIGCHLD */
    }
    if (L.line_open) fputc('\n', stderr);
    L.line_open = false;
    bool coord_ok = coord_status != -1 && WIFEXITED(coord_status) && WEXITSTATUS(coord_status) == 0;
    rc = coord_ok && !l_interrupted && !gave_up ? 0 : 1;
    if (rc == 0) {
        /* "completed" only once the final checkpoint reads back from the store */
        sy_store_t *st = NULL;
        sy_status vs = sy_store_open_config(&cfg, &st);
        if (vs == SY_OK) vs = sy_run_verify_checkpoint(st, cfg.run.name, cfg.run.steps, NULL);
        sy_store_destroy(&st);
        if (vs != SY_OK) {
            fprintf(stderr, "switchyard run: the coordinator reported success, but %s\n", sy_err_msg());
            rc = 1;
            goto stop_all;
        }
    }
    if (rc != 0) {
        if (coord_status == -1)
            fprintf(stderr, "switchyard run: the run %s\n", l_interrupted ? "was interrupted" : "failed");
        else
            fprintf(stderr, "switchyard run: the run %s (coordinator %s %d)\n",
                    l_interrupted ? "was interrupted" : "failed",
                    WIFEXITED(coord_status) ? "exit status" : "signal",
                    WIFEXITED(coord_status) ? WEXITSTATUS(coord_status) : WTERMSIG(coord_status));
        if (!l_interrupted) print_tail(L.coord_log, 20);
    } else if (!quiet) {
        fprintf(stderr, "switchyard run: run %s completed %lld steps; metrics in %s\n", cfg.run.name,
                (long long)cfg.run.steps, metrics_path);
    }

stop_all:
    /* workers exit on the coordinator's Stop; give them a grace period, then make sure */
    if (L.coord > 0) {
        kill(L.coord, SIGTERM);
        double ts = sy_mono_s();
        while (waitpid(L.coord, NULL, WNOHANG) != L.coord) {
            if ((sy_mono_s() - ts) * 1e3 > SY_LAUNCH_GRACE_MS) {
                kill(L.coord, SIGKILL);
                waitpid(L.coord, NULL, 0);
                break;
            }
            usleep(50 * 1000);
        }
        L.coord = -1;
    }
    if (L.w) {
        double ts = sy_mono_s();
        bool any = true, termed = false;
        while (any && (sy_mono_s() - ts) * 1e3 < SY_LAUNCH_GRACE_MS) {
            any = false;
            for (int i = 0; i < L.nw; i++) {
                if (L.w[i].pid <= 0) continue;
                if (waitpid(L.w[i].pid, NULL, WNOHANG) == L.w[i].pid) L.w[i].pid = -1;
                else any = true;
            }
            if (any && !termed && (sy_mono_s() - ts) > 2.0) {
                termed = true;
                for (int i = 0; i < L.nw; i++)
                    if (L.w[i].pid > 0) {
                        kill(L.w[i].pid, SIGTERM);
                        if (L.w[i].stopped) kill(L.w[i].pid, SIGCONT);
                    }
            }
            if (any) usleep(50 * 1000);
        }
        for (int i = 0; i < L.nw; i++)
            if (L.w[i].pid > 0) {
                kill(L.w[i].pid, SIGKILL);
                waitpid(L.w[i].pid, NULL, 0);
            }
    }
    goto out;
cfg_fail:
    fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
out:
    if (L.coord_fd >= 0) close(L.coord_fd);
    if (L.chaos_f) fclose(L.chaos_f);
    if (curl_ready) curl_global_cleanup();
    free(L.w);
    free(chaos);
    free(chaos_text);
    free(sets);
    sy_config_free(&cfg);
    return rc;
}
