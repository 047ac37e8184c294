/* sy_dataprep prepare ARGS...: runs `switchyard data prepare` (sy_data_cli) on its own, so the
 * Python tests need not depend on the full CLI. */
#include "cli/data_cli.h"

int main(int argc, char **argv) { return sy_data_cli(argc - 1, argv + 1); }
