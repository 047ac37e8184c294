/* `switchyard data prepare ...`: turns text files or llm.c shards into train and validation
 * shards for data.train / data.val. */
#ifndef SY_DATA_CLI_H
#define SY_DATA_CLI_H

/* argv[0] is "prepare". Returns a process exit code. */
int sy_data_cli(int argc, char **argv);

#endif
