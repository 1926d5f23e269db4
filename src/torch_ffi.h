// The error convention of magpie's C++ shims over libtorch (compiled by build.rs; read on the Rust
// side by src/torch_ffi.rs): a call returns 0, or 1 with the exception's message in `err`.
#pragma once

#include <cstring>
#include <exception>

namespace magpie {

inline void set_error(char* err, size_t len, const char* what) {
  if (len == 0) return;
  std::strncpy(err, what, len - 1);
  err[len - 1] = '\0';
}

// Runs `body`, turning an exception into the convention's 1 and message.
template <typename F>
int guarded(char* err, size_t len, F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    set_error(err, len, e.what());
  } catch (...) {
    set_error(err, len, "unknown C++ exception");
  }
  return 1;
}

}  // namespace magpie
