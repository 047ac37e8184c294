/* `switchyard status [--url http://127.0.0.1:8080] [--json]`: fetches GET /v1/status from a
 * coordinator (libcurl, bounded wait) and prints it as a table, or the raw JSON with --json.
 * argv[0] is the command name ("status"). Returns the process exit code: 0 printed, 1 the
 * coordinator is unreachable or answered badly (message on stderr), 2 bad usage.
 * Thread: main thread (calls curl_global_init). */
#ifndef SY_STATUS_CLI_H
#define SY_STATUS_CLI_H

int sy_status_cli(int argc, char **argv);

#endif
