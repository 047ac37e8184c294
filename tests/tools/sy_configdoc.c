/* Prints the Markdown reference of every config field (the text of docs/configuration.md).
 * Regenerate the page with: $BUILD/tests/sy_configdoc > docs/configuration.md */
#include <stdio.h>
#include <stdlib.h>

#include "base/config.h"

int main(void) {
    char *md = sy_config_doc_markdown();
    if (!md) {
        fprintf(stderr, "sy_configdoc: could not build the config reference\n");
        return 1;
    }
    int rc = fputs(md, stdout) < 0 || fflush(stdout) != 0 ? 1 : 0;
    free(md);
    return rc;
}
