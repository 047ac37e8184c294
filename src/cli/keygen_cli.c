#include "cli/keygen_cli.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "proto/curve.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: switchyard keygen PATH\n"
            "\n"
            "Makes a CurveZMQ key pair for the control plane and writes\n"
            "  PATH.key  public and secret key (mode 0600): the coordinator's cluster.curve_server_key,\n"
            "            or a worker's --curve-key (cluster.curve_worker_key)\n"
            "  PATH.pub  the public key: the workers' --curve-server-public\n"
            "            (cluster.curve_server_public), or a line of cluster.curve_authorized_keys\n"
            "Refuses to overwrite an existing file. Prints the public key (Z85).\n"
            "\n"
            "e.g.  switchyard keygen keys/coordinator && switchyard keygen keys/worker\n"
            "      cat keys/worker.pub > keys/authorized_workers\n");
}

int sy_keygen_cli(int argc, char **argv) {
    if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
        usage(stdout);
        return 0;
    }
    if (argc != 2 || argv[1][0] == '-') {
        usage(stderr);
        return 2;
    }
    const char *prefix = argv[1];
    size_t n = strlen(prefix);
    if (n > 4 && (!strcmp(prefix + n - 4, ".key") || !strcmp(prefix + n - 4, ".pub")))
        fprintf(stderr, "switchyard keygen: note: writing %s.key and %s.pub (PATH is without the suffix)\n",
                prefix, prefix);
    char kp[PATH_MAX + 8], pp[PATH_MAX + 8];
    if (sy_curve_keygen(prefix, kp, pp, sizeof kp) != SY_OK) {
        fprintf(stderr, "switchyard keygen: %s\n", sy_err_msg());
        return 1;
    }
    sy_curve_key k;
    if (sy_curve_load_key(pp, false, &k) != SY_OK) {
        fprintf(stderr, "switchyard keygen: %s\n", sy_err_msg());
        return 1;
    }
    printf("wrote %s (secret, mode 0600) and %s\npublic key %s\n", kp, pp, k.public_z85);
    return 0;
}
