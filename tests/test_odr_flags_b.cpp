// ODR check across compile flags, second translation unit: compiled with -march=native (see
// test_odr_flags_a.cpp, compiled for the x86-64 baseline).

#include <string>
#include <vector>

#include "odr_flags_common.hpp"

std::vector<double> odr_flags_b_layer(std::string& isa, bool& avx2, std::vector<double>& decode) {
  const OdrResult r = odr_run();
  isa = r.isa;
  avx2 = r.compiled_with_avx2;
  decode = r.decode;
  return r.layer;
}
