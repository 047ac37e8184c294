/* switchyard-worker: one per device (GPU) or CPU slot. See src/worker/agent.h. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker/agent.h"
#include "backend/backend.h"
#include "backend/cpu_setup.h"
#include "base/endpoint.h"
#include "base/log.h"
#include "comm/comm.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: switchyard-worker --coordinator tcp://HOST:PORT [options]\n"
            "\n"
            "A worker agent: registers with the coordinator, trains its share of the run with\n"
            "expert parallelism, reports every step, exits on Stop (or SIGINT/SIGTERM).\n"
            "\n"
            "options:\n"
            "  --coordinator URL   the coordinator's control endpoint (cluster.bind), required\n"
            "  --id ID             worker identity (default HOST-PID); a restarted worker may\n"
            "                      reuse its id\n"
            "  --backend NAME      compute backend: cpu or cuda (default: the run config's\n"
            "                      cluster.backend)\n"
            "  --device N          CUDA device of the cuda backend (default 0)\n"
            "  --comm NAME         data plane: tcp, or nccl (GPU workers: needs --backend cuda)\n"
            "                      (default: nccl with --backend cuda, else tcp; switchyard run\n"
            "                      passes the run config's cluster.comm)\n"
            "  --data-bind ADDR    data-plane bind address (default tcp://127.0.0.1:*, * = any port)\n"
            "  --threads N         compute threads, 1 to the number of cores this process may\n"
            "                      use (nproc) (default: the run config's train.threads, capped\n"
            "                      at the cores)\n"
            "  --connect-timeout S give up (exit 1) after S seconds without an answer from the\n"
            "                      coordinator, at start or after losing touch (default %d;\n"
            "                      0: never); meanwhile a line is logged at growing intervals\n"
            "  --curve-server-public FILE\n"
            "                      CurveZMQ: the coordinator's public key (its .pub file of\n"
            "                      `switchyard keygen`); needs --curve-key\n"
            "  --curve-key FILE    CurveZMQ: this worker's key pair (a .key file, mode 0600); its\n"
            "                      public key must be in the coordinator's cluster.curve_authorized_keys\n"
            "  --insecure          allow a --data-bind address reachable from other machines without\n"
            "                      --curve-key (refused otherwise, exit 2); every generation's log\n"
            "                      line then carries a warning (the run config's cluster.insecure)\n"
            "  -h, --help          this help\n"
            "\n"
            "\n"
            "Exit status: 0 stopped (Stop, SIGINT/SIGTERM; a worker still busy 1 s after the\n"
            "signal exits 1), 1 error or no coordinator within --connect-timeout, 2 bad usage\n"
            "(a bad address, --threads beyond the cores) or key file,\n"
            "4 the coordinator refused the connection: a CURVE key not authorized, CURVE on one\n"
            "side only, or %d failed handshakes in a row (a wrong --curve-server-public).\n"
            "\n"
            "environment: SY_LOG=debug|info|warn|error\n",
            SY_AGENT_CONNECT_TIMEOUT_S, SY_AGENT_HANDSHAKE_MAX_FAILS);
}

int main(int argc, char **argv) {
    sy_cpu_setup(argc, argv);
    sy_log_init_from_env();
    static const struct option longopts[] = {{"coordinator", required_argument, 0, 'c'},
                                             {"id", required_argument, 0, 'i'},
                                             {"backend", required_argument, 0, 'b'},
                                             {"device", required_argument, 0, 'D'},
                                             {"data-bind", required_argument, 0, 'd'},
                                             {"comm", required_argument, 0, 'C'},
                                             {"threads", required_argument, 0, 't'},
                                             {"curve-server-public", required_argument, 0, 'P'},
                                             {"curve-key", required_argument, 0, 'K'},
                                             {"connect-timeout", required_argument, 0, 'T'},
                                             {"insecure", no_argument, 0, 'I'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    sy_agent_opts o = {.backend = NULL, .connect_timeout_s = SY_AGENT_CONNECT_TIMEOUT_S};
    int cores = sy_cpu_count();
    int c;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'c': o.coordinator = optarg; break;
        case 'i': o.id = optarg; break;
        case 'b': o.backend = optarg; break;
        case 'D': {
            char *end;
            long v = strtol(optarg, &end, 10);
            if (!*optarg || *end || v < 0 || v > 1023) {
                fprintf(stderr, "switchyard-worker: --device %s: expected a CUDA device number >= 0\n", optarg);
                return 2;
            }
            o.device = (int)v;
            break;
        }
        case 'd': o.data_bind = optarg; break;
        case 'C': o.comm = optarg; break;
        case 'P': o.curve_server_public = optarg; break;
        case 'K': o.curve_key = optarg; break;
        case 'I': o.insecure = true; break;
        case 't': {
            char *end;
            long v = strtol(optarg, &end, 10);
            if (!*optarg || *end || v < 0 || v > cores) {
                fprintf(stderr,
                        "switchyard-worker: --threads %s: expected an integer from 1 to %d (the cores this process "
                        "may use; 0 = the run config's train.threads)\n",
                        optarg, cores);
                return 2;
            }
            o.threads = (int)v;
            break;
        }
        case 'T': {
            char *end;
            long v = strtol(optarg, &end, 10);
            if (!*optarg || *end || v < 0 || v > 86400 * 365) {
                fprintf(stderr, "switchyard-worker: --connect-timeout %s: expected seconds, an integer >= 0\n", optarg);
                return 2;
            }
            o.connect_timeout_s = (int)v;
            break;
        }
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!o.coordinator || optind != argc) {
        fprintf(stderr, "switchyard-worker: --coordinator is required\n");
        usage(stderr);
        return 2;
    }
    if (sy_endpoint_check(o.coordinator, false, "--coordinator") != SY_OK ||
        (o.data_bind && sy_endpoint_check(o.data_bind, true, "--data-bind") != SY_OK)) {
        fprintf(stderr, "switchyard-worker: %s\n", sy_err_msg());
        return 2;
    }
    if (o.data_bind && strncmp(o.data_bind, "tcp://", 6) != 0) {
        fprintf(stderr, "switchyard-worker: --data-bind '%s': the data plane needs a tcp:// address\n", o.data_bind);
        return 2;
    }
    if (!o.curve_key != !o.curve_server_public) {
        fprintf(stderr, "switchyard-worker: --curve-key and --curve-server-public go together\n");
        return 2;
    }
    /* issue 12 #1: a data plane other machines can reach is authenticated, or explicitly not */
    if (o.data_bind && !o.curve_key && !sy_endpoint_is_loopback(o.data_bind)) {
        if (!o.insecure) {
            fprintf(stderr,
                    "switchyard-worker: --data-bind %s: reachable from other machines, and no CurveZMQ key is "
                    "given: anyone who reaches it could send rows to this worker. Give --curve-key FILE and "
                    "--curve-server-public FILE (switchyard keygen; docs/deployment.md), or bind a loopback "
                    "address, or pass --insecure to run unauthenticated\n",
                    o.data_bind);
            return 2;
        }
        sy_warn("INSECURE: --insecure: the data plane on %s is reachable from other machines without CurveZMQ",
                o.data_bind);
    }
    if (o.comm && strcmp(o.comm, "tcp") != 0 && strcmp(o.comm, "nccl") != 0) {
        /* "threads" (comm.h) runs ranks as threads of one process: no use between workers */
        fprintf(stderr, "switchyard-worker: --comm %s: expected tcp or nccl\n", o.comm);
        return 2;
    }
    if (o.backend && strcmp(o.backend, "cpu") != 0 && strcmp(o.backend, "cuda") != 0) {
        fprintf(stderr, "switchyard-worker: --backend %s: expected cpu or cuda\n", o.backend);
        return 2;
    }
    if (!o.comm) o.comm = o.backend && strcmp(o.backend, "cuda") == 0 ? "nccl" : "tcp";
    if (strcmp(o.comm, "nccl") == 0) {
        /* fail now, clearly: nccl moves device memory, so it needs the cuda backend and a GPU */
        if (o.backend && strcmp(o.backend, "cuda") != 0) {
            fprintf(stderr, "switchyard-worker: --comm nccl needs --backend cuda (nccl moves device memory between "
                            "GPU workers); with the cpu backend use --comm tcp\n");
            return 2;
        }
    }
    if (o.backend && strcmp(o.backend, "cuda") == 0) {
        /* fail now, clearly, rather than at the first generation */
        char why[256];
        int n = sy_backend_cuda_devices(why, sizeof why);
        if (n <= 0 || o.device >= n) {
            fprintf(stderr, "switchyard-worker: --backend cuda --device %d: %s%s\n", o.device,
                    n <= 0 ? "no usable CUDA device: " : "no such device: ", why);
            return 2;
        }
    }
    if (strcmp(o.comm, "nccl") == 0) {
        /* after the backend's check: a missing GPU is named as the backend's problem first */
        char why[1024];
        if (sy_comm_nccl_available(why, sizeof why) <= 0) {
            fprintf(stderr, "switchyard-worker: --comm nccl: %s; use --comm tcp (cluster.comm: tcp) on a machine "
                            "without a GPU or NCCL\n", why);
            return 2;
        }
    }
    return sy_agent_run(&o);
}
