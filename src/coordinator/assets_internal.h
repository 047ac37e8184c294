/* Files built into the coordinator by cmake/sy_embed.cmake (CMakeLists.txt): the dashboard page
 * (src/coordinator/dashboard.html) and the charting library it uses (dygraphs, from the Debian
 * package libjs-dygraphs). Each array is NUL-terminated; _len excludes the NUL. */
#ifndef SY_ASSETS_INTERNAL_H
#define SY_ASSETS_INTERNAL_H

#include <stddef.h>

extern const unsigned char sy_asset_dashboard_html[];
extern const size_t sy_asset_dashboard_html_len;
extern const unsigned char sy_asset_dygraph_js[];
extern const size_t sy_asset_dygraph_js_len;
extern const unsigned char sy_asset_dygraph_css[];
extern const size_t sy_asset_dygraph_css_len;

#endif
