// 2^t on 16 fp32 lanes, shared by the bf16 kernels that need an exponential (prefill attention's online
// softmax, the prefill MLP's activations).

#pragma once

#include "bf16_linear_avx512.h"  // QD_AVX512_BF16: compilers that know AVX-512 BF16 (the kernels' target)

#ifdef QD_AVX512_BF16
#include <immintrin.h>

namespace qd_vec {

// Relative error under 6e-6 (a degree-4 fit of 2^f on [-1/2, 1/2], scaled by 2^n with n = round(t)):
// ample for values rounded to bf16 (2^-9). Past the fp32 range scalef gives 0 or infinity; an infinite t
// makes f NaN, so callers that may see one clamp t first.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline __m512 exp2_vec(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.009554105f), f, _mm512_set1_ps(0.05587041f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24024697f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69312803f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.99999944f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace qd_vec
#endif
