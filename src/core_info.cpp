#include "core_info.hpp"

#ifndef MLSURROGATE_VERSION
#define MLSURROGATE_VERSION "0.1.0"
#endif

namespace mlsurrogate {

const char *core_version() { return MLSURROGATE_VERSION; }

}  // namespace mlsurrogate
