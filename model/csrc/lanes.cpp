// The float lanes per vector this build was compiled for (vec.h's kLanes), read by the loader through ctypes:
// the proof of which kernel width runs, e.g. that a forced 16-lane test build loaded and not the 8-lane one.
// A plain C symbol, no torch headers: this file compiles in well under a second (torch/library.h takes ~30 s).

#include "vec.h"

extern "C" __attribute__((visibility("default"))) int customllm_vector_lanes() { return customllm::kLanes; }
