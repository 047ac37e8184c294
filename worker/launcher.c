#include "launcher.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "log.h"

#define SY_LAUNCH_READY_TIMEOUT_MS 30000
#define SY_LAUNCH_GRACE_MS 10000
#define SY_LAUNCH_TICK_MS 200

static volatile sig_atomic_t l_interrupted = 0;
static void l_on_signal(int sig) {
    (void)sig;
    l_interrupted++;
}

static double l_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

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
            "  --quiet                     no progress line\n"
            "  -h, --help                  this help\n"
            "\n"
            "Logs: RUN.state_dir/logs/coordinator.log and worker-K.log. Metrics: the\n"
            "coordinator's RUN.state_dir/metrics.jsonl and events.jsonl; while it runs, the status\n"
            "endpoint printed at start (switchyard status --url URL).\n");
}

static pid_t spawn(char *const argv[], const char *log_path, int stdout_pipe[2]) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    /* child */
    setpgid(0, 0); /* Ctrl-C goes to the launcher, which stops children in order */
    int fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
        dup2(fd, STDERR_FILENO);
        if (!stdout_pipe) dup2(fd, STDOUT_FILENO);
        close(fd);
    }
    if (stdout_pipe) {
        close(stdout_pipe[0]);
        dup2(stdout_pipe[1], STDOUT_FILENO);
        close(stdout_pipe[1]);
    }
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

static void fmt_eta(char *buf, size_t cap, double s) {
    if (s < 0 || !isfinite(s)) s = 0;
    int h = (int)(s / 3600), mi = (int)(fmod(s, 3600) / 60), se = (int)fmod(s, 60);
    if (h > 0) snprintf(buf, cap, "%dh%02dm", h, mi);
    else snprintf(buf, cap, "%dm%02ds", mi, se);
}

int sy_run_cli(int argc, char **argv) {
    static const struct option longopts[] = {{"workers", required_argument, 0, 'w'},
                                             {"set", required_argument, 0, 's'},
                                             {"threads", required_argument, 0, 't'},
                                             {"quiet", no_argument, 0, 'q'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    int n_workers = 2, threads = 0, c, rc = 2;
    bool quiet = false;
    char **sets = calloc((size_t)argc + 1, sizeof(char *));
    int n_sets = 0;
    sy_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    pid_t coord = -1, *workers = NULL;
    FILE *coord_out = NULL;
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
            if (*end || v < 1 || v > 4096) {
                fprintf(stderr, "switchyard run: --threads %s: expected an integer in [1, 4096]\n", optarg);
                goto out;
            }
            threads = (int)v;
            break;
        }
        case 's': sets[n_sets++] = optarg; break;
        case 'q': quiet = true; break;
        case 'h': usage(stdout); rc = 0; goto out;
        default: usage(stderr); goto out;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "switchyard run: expected exactly one CONFIG file\n");
        usage(stderr);
        goto out;
    }
    const char *config_path = argv[optind];
    if (sy_config_defaults(&cfg) != SY_OK || sy_config_load(&cfg, config_path) != SY_OK) goto cfg_fail;
    for (int i = 0; i < n_sets; i++)
        if (sy_config_set(&cfg, sets[i]) != SY_OK) goto cfg_fail;
    if (sy_config_validate(&cfg) != SY_OK) goto cfg_fail;
    if (n_workers < cfg.cluster.min_workers) {
        fprintf(stderr, "switchyard run: --workers %d is below cluster.min_workers = %d\n", n_workers,
                cfg.cluster.min_workers);
        goto out;
    }
    if (threads == 0) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        threads = (int)(cores / n_workers);
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
    char logdir[PATH_MAX], path[PATH_MAX + 64], metrics_path[PATH_MAX + 64];
    snprintf(logdir, sizeof logdir, "%s/logs", cfg.run.state_dir);
    char mk[PATH_MAX + 16];
    snprintf(mk, sizeof mk, "%s", logdir);
    for (char *p = mk + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            mkdir(mk, 0755);
            *p = '/';
        }
    mkdir(mk, 0755);
    snprintf(metrics_path, sizeof metrics_path, "%s/metrics.jsonl", cfg.run.state_dir);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = l_on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    /* coordinator */
    char **cargv = calloc((size_t)(2 * n_sets + 12), sizeof(char *));
    char expect[16];
    snprintf(expect, sizeof expect, "%d", n_workers);
    int ca = 0;
    cargv[ca++] = coord_bin;
    cargv[ca++] = (char *)config_path;
    for (int i = 0; i < n_sets; i++) cargv[ca++] = "--set", cargv[ca++] = sets[i];
    cargv[ca++] = "--bind";
    cargv[ca++] = "tcp://127.0.0.1:0";
    cargv[ca++] = "--status-addr";
    cargv[ca++] = "127.0.0.1:0";
    cargv[ca++] = "--expect-workers";
    cargv[ca++] = expect;
    int pfd[2];
    if (pipe(pfd) != 0) goto out;
    snprintf(path, sizeof path, "%s/coordinator.log", logdir);
    char coord_log[PATH_MAX + 64];
    snprintf(coord_log, sizeof coord_log, "%s", path);
    coord = spawn(cargv, path, pfd);
    free(cargv);
    close(pfd[1]);
    coord_out = fdopen(pfd[0], "r");
    char line[1024], bind[512] = "", status[512] = "";
    double t0 = l_now();
    while (fgets(line, sizeof line, coord_out)) {
        if (sscanf(line, "coordinator ready bind=%511s status=%511s", bind, status) == 2) break;
        if ((l_now() - t0) * 1e3 > SY_LAUNCH_READY_TIMEOUT_MS) break;
    }
    if (!bind[0]) {
        fprintf(stderr, "switchyard run: the coordinator did not start\n");
        print_tail(coord_log, 20);
        goto stop_all;
    }
    if (!quiet)
        fprintf(stderr, "switchyard run: coordinator at %s, status %s; %d workers; logs in %s\n", bind,
                status, n_workers, logdir);

    workers = calloc((size_t)n_workers, sizeof(pid_t));
    for (int i = 0; i < n_workers; i++) {
        char id[32], th[16];
        snprintf(id, sizeof id, "w%d", i);
        snprintf(th, sizeof th, "%d", threads);
        char *wargv[] = {worker_bin, "--coordinator", bind, "--id", id, "--threads", th, NULL};
        snprintf(path, sizeof path, "%s/worker-%d.log", logdir, i);
        workers[i] = spawn(wargv, path, NULL);
    }

    /* progress until the coordinator exits */
    const bool tty = isatty(STDERR_FILENO);
    long moff = 0;
    int coord_status = -1;
    int64_t last_step = 0, first_step = -1, shown_step = 0;
    double first_t = 0, loss = NAN, tps = 0;
    int world = 0, gen = 0;
    double stop_sent = 0;
    for (;;) {
        int st;
        pid_t p = waitpid(coord, &st, WNOHANG);
        if (p == coord) {
            coord_status = st;
            coord = -1;
            break;
        }
        for (int i = 0; i < n_workers; i++) {
            if (workers[i] > 0 && waitpid(workers[i], &st, WNOHANG) == workers[i]) {
                if (!quiet) {
                    if (tty) fputc('\n', stderr);
                    fprintf(stderr, "switchyard run: worker w%d exited (%s %d)\n", i,
                            WIFEXITED(st) ? "status" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
                }
                workers[i] = -1;
            }
        }
        if (l_interrupted && stop_sent == 0) {
            if (!quiet) fprintf(stderr, "%sswitchyard run: stopping...\n", tty ? "\n" : "");
            kill(coord, SIGTERM);
            stop_sent = l_now();
        }
        if (stop_sent > 0 && (l_now() - stop_sent) * 1e3 > SY_LAUNCH_GRACE_MS) kill(coord, SIGKILL);
        /* new metrics lines */
        FILE *mf = fopen(metrics_path, "r");
        if (mf) {
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
                if (first_step < 0) first_step = last_step, first_t = l_now();
                json_decref(j);
            }
            free(ml);
            fclose(mf);
        }
        if (!quiet && last_step > 0 && last_step != shown_step) {
            shown_step = last_step;
            char eta[32];
            double el = l_now() - first_t;
            double rate = last_step > first_step ? (last_step - first_step) / el : 0;
            fmt_eta(eta, sizeof eta, rate > 0 ? (cfg.run.steps - last_step) / rate : NAN);
            fprintf(stderr, "%sstep %lld/%lld | loss %.4f | %.1fk tok/s | workers %d | gen %d | ETA %s%s",
                    tty ? "\r" : "", (long long)last_step, (long long)cfg.run.steps, loss, tps / 1e3,
                    world, gen, eta, tty ? "\033[K" : "\n");
        }
        usleep(SY_LAUNCH_TICK_MS * 1000);
    }
    if (!quiet && tty) fputc('\n', stderr);
    rc = WIFEXITED(coord_status) && WEXITSTATUS(coord_status) == 0 && !l_interrupted ? 0 : 1;
    if (rc != 0) {
        fprintf(stderr, "switchyard run: the run %s (coordinator %s %d)\n", l_interrupted ? "was interrupted" : "failed",
                WIFEXITED(coord_status) ? "exit status" : "signal",
                WIFEXITED(coord_status) ? WEXITSTATUS(coord_status) : WTERMSIG(coord_status));
        if (!l_interrupted) print_tail(coord_log, 20);
    } else if (!quiet) {
        fprintf(stderr, "switchyard run: run %s completed %lld steps; metrics in %s\n", cfg.run.name,
                (long long)cfg.run.steps, metrics_path);
    }

stop_all:
    /* workers exit on the coordinator's Stop; give them a grace period, then make sure */
    if (coord > 0) {
        kill(coord, SIGTERM);
        waitpid(coord, NULL, 0);
    }
    if (workers) {
        double ts = l_now();
        bool any = true;
        while (any && (l_now() - ts) * 1e3 < SY_LAUNCH_GRACE_MS) {
            any = false;
            for (int i = 0; i < n_workers; i++) {
                if (workers[i] <= 0) continue;
                if (waitpid(workers[i], NULL, WNOHANG) == workers[i]) workers[i] = -1;
                else any = true;
            }
            if (any) usleep(50 * 1000);
            if (any && (l_now() - ts) > 2.0)
                for (int i = 0; i < n_workers; i++)
                    if (workers[i] > 0) kill(workers[i], SIGTERM);
        }
        for (int i = 0; i < n_workers; i++)
            if (workers[i] > 0) {
                kill(workers[i], SIGKILL);
                waitpid(workers[i], NULL, 0);
            }
    }
    goto out;
cfg_fail:
    fprintf(stderr, "switchyard run: %s\n", sy_err_msg());
out:
    if (coord_out) fclose(coord_out);
    free(workers);
    free(sets);
    sy_config_free(&cfg);
    return rc;
}
