// ODR check across compile flags: this unit is compiled for the x86-64 baseline and
// test_odr_flags_b.cpp with -march=native, and both use the whole library. No library function
// may change its body with the flags (the kernels of every instruction set are compiled in both,
// and the choice between them is made at run time), so both units must pick the same target,
// agree with each other, and agree with the double reference of tests/reference/.

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "odr_flags_common.hpp"
#include "reference/mla_reference.hpp"
#include "test_util.hpp"

// Defined in test_odr_flags_b.cpp.
std::vector<double> odr_flags_b_layer(std::string& isa, bool& avx2, std::vector<double>& decode);

namespace {

TEST(OdrFlags, UnitsBuiltForDifferentTargetsRunAndAgree) {
  const OdrResult a = odr_run();
  std::string isa_b;
  bool avx2_b = false;
  std::vector<double> decode_b;
  const std::vector<double> layer_b = odr_flags_b_layer(isa_b, avx2_b, decode_b);
  // The test means something only when the units were really compiled differently.
  EXPECT_FALSE(a.compiled_with_avx2) << "unit a should be built for the x86-64 baseline";
  if (!avx2_b) GTEST_SKIP() << "-march=native gives no AVX2 here: nothing differs";
  EXPECT_EQ(a.isa, isa_b);
  EXPECT_EQ(a.isa, mla::to_string(mla::active_isa()));
  // The same kernels on the same data; the projections are Eigen GEMMs compiled for each
  // unit's target, which round differently: float accuracy.
  EXPECT_LE(test::rel_error(a.layer, layer_b), 1e-6);
  EXPECT_LE(test::rel_error(a.decode, decode_b), 1e-6);
  // And both against the reference.
  const mla::MlaConfig c = mla::MlaConfig::small_v3();
  mla::RowMatrix<float> x(18, c.hidden_size);
  for (mla::Index i = 0; i < x.size(); ++i)
    x.data()[i] = static_cast<float>((i * 37 % 101) - 50) / 50;
  const std::vector<double> want = ref::mla_forward(
      test::to_ref(c), test::to_ref(mla::MlaWeights<float>::random(c, 3)), test::to_vec(x), 18, 0);
  EXPECT_LE(test::rel_error(a.layer, want), 1e-5);
  EXPECT_LE(test::rel_error(layer_b, want), 1e-5);
}

}  // namespace
