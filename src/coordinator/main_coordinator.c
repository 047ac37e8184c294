/* switchyard-coordinator: one run's control plane (src/coordinator/coord.h). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "base/config.h"
#include "coordinator/coord.h"
#include "base/endpoint.h"
#include "base/log.h"
#include "base/secret.h"

static volatile sig_atomic_t g_stop;

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: switchyard-coordinator CONFIG [--set section.field=value ...] [--bind tcp://HOST:PORT]\n"
            "                              [--status-addr HOST:PORT] [--help]\n"
            "\n"
            "Runs the coordinator of one training run: workers (switchyard-worker --coordinator ...)\n"
            "register with it over ZeroMQ; it assigns ranks and experts, aggregates step reports into\n"
            "RUN.STATE_DIR/metrics.jsonl, commits checkpoints, recovers from lost workers, and serves\n"
            "GET /, /v1/status and /metrics on the status address.\n"
            "\n"
            "  --set k=v            override a config field (repeatable)\n"
            "  --bind EP            control endpoint (default: cluster.bind); port 0 picks a free port\n"
            "  --status-addr H:P    HTTP status address (default: status.addr); port 0 picks a free port\n"
            "  --expect-workers N   open the first generation only once N workers have registered\n"
            "                       (or after 60 s): a launcher starting N workers at once uses it\n"
            "\n"
            "Environment: SY_STATUS_TOKEN, when status.token and status.token_file are empty, is the\n"
            "bearer token of the POST endpoints (keeps it out of ps and of config files).\n"
            "\n"
            "A control endpoint reachable from other machines (cluster.bind not a loopback address)\n"
            "needs CurveZMQ keys (cluster.curve_server_key, switchyard keygen) or cluster.insecure:\n"
            "true; without either the coordinator refuses to start (exit 2).\n"
            "\n"
            "Once bound it prints one line on stdout:\n"
            "  coordinator ready bind=tcp://HOST:PORT status=http://HOST:PORT\n"
            "Exit status: 0 the run finished, 1 error or failed run, 3 stopped early (signal or\n"
            "POST /v1/stop), 2 bad usage or config.\n");
}

/* Many workers and status clients need many descriptors: lift the soft RLIMIT_NOFILE to the
 * hard limit (issue 16 #2; the HTTP server uses epoll and has its own connection limits, so
 * descriptors above FD_SETSIZE are fine everywhere). */
static void raise_fd_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= rl.rlim_max) return;
    rlim_t was = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) == 0)
        sy_debug("open files limit raised from %llu to %llu", (unsigned long long)was, (unsigned long long)rl.rlim_cur);
}

/* Nothing listens off-loopback unauthenticated (issue 12 #1, docs/security.md): a control
 * endpoint other machines can reach needs CurveZMQ, unless cluster.insecure says otherwise (then
 * a warning here and in every generation_opened line). The status server is read-only without
 * a token (its POST endpoints are off), so an off-loopback one without a token is warned about,
 * not refused: Prometheus and the dashboard read it. */
static sy_status check_exposure(const sy_config_t *cfg, const char *bind_flag, const char *status_flag) {
    const char *bind = bind_flag ? bind_flag : cfg->cluster.bind;
    const char *bwhat = bind_flag ? "--bind" : "cluster.bind";
    bool curve = cfg->cluster.curve_server_key && cfg->cluster.curve_server_key[0];
    if (!curve && !sy_endpoint_is_loopback(bind)) {
        if (!cfg->cluster.insecure)
            return sy_err_set(SY_EINVAL,
                              "%s = %s: reachable from other machines, and CurveZMQ is off: anyone who reaches it "
                              "could join the run. Make keys (switchyard keygen KEYDIR/coordinator; switchyard "
                              "keygen KEYDIR/worker; cat KEYDIR/worker.pub > KEYDIR/authorized_workers) and set "
                              "cluster.curve_server_key and cluster.curve_authorized_keys (docs/deployment.md), "
                              "or bind a loopback address (tcp://127.0.0.1:PORT), or set cluster.insecure: true "
                              "to run unauthenticated",
                              bwhat, bind);
        sy_warn("INSECURE: cluster.insecure is true and %s = %s is reachable from other machines without "
                "CurveZMQ: anyone who reaches it can join the run",
                bwhat, bind);
    }
    const char *saddr = status_flag ? status_flag : cfg->status.addr;
    if (!sy_endpoint_is_loopback(saddr) && !cfg->status.token[0])
        sy_warn("the status server on %s is reachable from other machines: anyone who reaches it reads the "
                "run's status and metrics (its POST endpoints stay off: no status.token)",
                saddr);
    return SY_OK;
}

int main(int argc, char **argv) {
    sy_config_t cfg;
    sy_coord_t *c = NULL;
    const char *path = NULL, *bind = NULL, *status_addr = NULL;
    int expect = 0;
    int code = 1;
    sy_log_set_role("coord");
    sy_log_init_from_env();
    if (sy_config_defaults(&cfg) != SY_OK) {
        fprintf(stderr, "switchyard-coordinator: %s\n", sy_err_msg());
        return 1;
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            code = 0;
            goto out;
        }
    }
    /* The config file first, then the overrides, whatever their order on the command line. */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--set") || !strcmp(a, "--bind") || !strcmp(a, "--status-addr") ||
            !strcmp(a, "--expect-workers")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "switchyard-coordinator: %s needs a value\n", a);
                code = 2;
                goto out;
            }
            if (!strcmp(a, "--bind")) bind = argv[i + 1];
            if (!strcmp(a, "--status-addr")) status_addr = argv[i + 1];
            if (!strcmp(a, "--expect-workers")) {
                char *end;
                long v = strtol(argv[i + 1], &end, 10);
                if (*end || v < 0 || v > 65535) {
                    fprintf(stderr, "switchyard-coordinator: --expect-workers %s: expected an integer in [0, 65535]\n", argv[i + 1]);
                    code = 2;
                    goto out;
                }
                expect = (int)v;
            }
            i++;
        } else if (a[0] == '-') {
            fprintf(stderr, "switchyard-coordinator: unknown option %s (see --help)\n", a);
            code = 2;
            goto out;
        } else if (path) {
            fprintf(stderr, "switchyard-coordinator: more than one config file (%s, %s)\n", path, a);
            code = 2;
            goto out;
        } else {
            path = a;
        }
    }
    if (!path) {
        usage(stderr);
        code = 2;
        goto out;
    }
    if (sy_config_load(&cfg, path) != SY_OK) {
        fprintf(stderr, "switchyard-coordinator: %s\n", sy_err_msg());
        code = 2;
        goto out;
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--set")) {
            if (sy_config_set(&cfg, argv[++i]) != SY_OK) {
                fprintf(stderr, "switchyard-coordinator: %s\n", sy_err_msg());
                code = 2;
                goto out;
            }
        } else if (!strcmp(argv[i], "--bind") || !strcmp(argv[i], "--status-addr") ||
                   !strcmp(argv[i], "--expect-workers")) {
            i++;
        }
    }
    /* a bad value is reported against the --set that gave it, else against the YAML file */
    char **sets = calloc((size_t)argc, sizeof *sets);
    int n_sets = 0;
    for (int i = 1; sets && i + 1 < argc; i++)
        if (!strcmp(argv[i], "--set")) sets[n_sets++] = argv[++i];
    for (int i = 0; i < n_sets; i++)
        if (!strncmp(sets[i], "status.token=", 13) && sets[i][13])
            sy_warn("status.token was given with --set: every local user can read it in this process's command "
                    "line (ps); use status.token_file (mode 0600) or the environment variable " SY_STATUS_TOKEN_ENV);
    sy_status vs = sy_config_validate_from(&cfg, path, sets, n_sets);
    free(sets);
    if (vs != SY_OK) {
        fprintf(stderr, "switchyard-coordinator: %s\n", sy_err_msg());
        code = 2;
        goto out;
    }
    /* The token: status.token, else status.token_file (mode 0600), else SY_STATUS_TOKEN. */
    if (!cfg.status.token[0]) {
        char tok[SY_SECRET_MAX + 1], set[SY_SECRET_MAX + 32];
        sy_status ts = sy_secret_status_token(NULL, cfg.status.token_file, tok, sizeof tok);
        if (ts == SY_OK && tok[0]) {
            snprintf(set, sizeof set, "status.token=%s", tok);
            ts = sy_config_set(&cfg, set);
            explicit_bzero(set, sizeof set);
        }
        explicit_bzero(tok, sizeof tok);
        if (ts != SY_OK) {
            fprintf(stderr, "switchyard-coordinator: %s\n", sy_err_msg());
            code = 2;
            goto out;
        }
    }

    if (sy_endpoint_check(bind ? bind : cfg.cluster.bind, true, bind ? "--bind" : "cluster.bind") != SY_OK ||
        check_exposure(&cfg, bind, status_addr) != SY_OK) {
        fprintf(stderr, "switchyard-coordinator: %s\n", sy_err_msg());
        code = 2;
        goto out;
    }
    raise_fd_limit();

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    sy_coord_opts opts = {.bind = bind, .status_addr = status_addr, .expect_workers = expect};
    if (sy_coord_new(&cfg, &opts, &c) != SY_OK) {
        fprintf(stderr, "switchyard-coordinator: %s\n", sy_err_msg());
        goto out;
    }
    printf("coordinator ready bind=%s status=%s\n", sy_coord_endpoint(c), sy_coord_status_url(c));
    fflush(stdout);
    sy_coord_outcome outcome = SY_COORD_FAILED;
    if (sy_coord_run(c, &g_stop, &outcome) != SY_OK) {
        fprintf(stderr, "switchyard-coordinator: %s\n", sy_err_msg());
        goto out;
    }
    code = outcome == SY_COORD_FINISHED ? 0 : outcome == SY_COORD_STOPPED ? 3 : 1;
out:
    sy_coord_destroy(&c);
    sy_config_free(&cfg);
    return code;
}
