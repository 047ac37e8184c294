/* `switchyard data prepare ...`: turns text files or llm.c shards into train and validation
 * shards for data.train / data.val. `switchyard data check [CONFIG]`: validates every shard of
 * a config's data.train and data.val whole (training checks tokens as it reads them). */
#ifndef SY_DATA_CLI_H
#define SY_DATA_CLI_H

/* argv[0] is "prepare" or "check". Returns a process exit code. */
int sy_data_cli(int argc, char **argv);

#endif
