// Build and version information of the mlsurrogate C++ core.
#pragma once

namespace mlsurrogate {

// Version of the C++ core library ("0.1.0"); equals the Python package version.
const char *core_version();

}  // namespace mlsurrogate
