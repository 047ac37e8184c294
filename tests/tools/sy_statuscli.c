/* Runs sy_status_cli (the `switchyard status` command) on its own, for the coordinator tests:
 *   sy_statuscli [--url URL] [--json] */
#include "cli/status_cli.h"

int main(int argc, char **argv) { return sy_status_cli(argc, argv); }
