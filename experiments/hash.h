// Run identifiers: a stable 64-bit hash of the canonical resolved config text, so that the same
// config gives the same id on every platform, build and run (used for resume and for joining
// result files). FNV-1a is not cryptographic; it only has to tell configs apart.
#pragma once
#include <string>

#include "core/hash.h"

namespace ql {

/// 16 lowercase hex digits of fnv1a64(canonical_text), zero-padded.
/// `canonical_text` should be ConfigNode::to_yaml() of the resolved config.
std::string run_id_of(const std::string& canonical_text);

}  // namespace ql
