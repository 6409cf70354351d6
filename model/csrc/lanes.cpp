// The float lanes per vector this build was compiled for (vec.h's kLanes): the loader's proof of which kernel
// width runs, e.g. that a forced 16-lane test build loaded and not the 8-lane one.

#include <torch/library.h>

#include "vec.h"

namespace customllm {
namespace {

int64_t vector_lanes() { return kLanes; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(customllm, m) { m.def("vector_lanes() -> int", &vector_lanes); }

}  // namespace customllm
