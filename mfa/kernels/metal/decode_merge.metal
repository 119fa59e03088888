// decode_merge: combine decode_split's per-split partials by their log-sum-exp (flash-decoding).
//
// Kernel body only (see decode_split.metal).  One threadgroup per output row (query head, new
// token, batch row), one thread per output feature:
//   lse = log2 Σ_s 2^lse_s,   out = Σ_s 2^(lse_s − lse) · o_s
// then the per-head sink logit joins the denominator: lse' = log2(2^lse + 2^(sink·log2 e)),
// out · 2^(lse − lse').  lse is written in natural-log units.
//   inputs:   o_part (B, HKV, QC, S, QR, D) float32, lse_part (B, HKV, QC, S, QR) float32 (log2),
//             sinks (H,) float32 (SINKS), params int32 [H, HKV, NQ, QC, S, QR]
//   outputs:  out (B, H, NQ, D) in T, lse (B, H, NQ) float32 (-inf: nothing attended, out = 0)
//   template: T, D, SINKS
//   grid (D, H·NQ, B), threadgroup (D, 1, 1)
constexpr float LOG2E = 1.4426950408889634f;
const int row = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);
const int d = int(thread_index_in_threadgroup);
const int H = params[0], HKV = params[1], NQ = params[2], QC = params[3], S = params[4], QR = params[5];
const int h = row / NQ, i = row % NQ;
const int G = H / HKV;
const int kvh = h / G, rr = (h % G) * NQ + i;  // this head's row among its KV head's query rows
const long base = (long(b * HKV + kvh) * QC + rr / QR) * S;
const int r = rr % QR;

if (d < D) {
  float m_all = -MFA_INF;
  for (int s = 0; s < S; ++s) m_all = mfa_fmaxf(m_all, lse_part[(base + s) * QR + r]);
  const float m_use = m_all == -MFA_INF ? 0.0f : m_all;
  float l_all = 0.0f, o = 0.0f;
  for (int s = 0; s < S; ++s) {
    const float w = mfa_exp2f(lse_part[(base + s) * QR + r] - m_use);
    l_all += w;
    o += w * o_part[((base + s) * QR + r) * D + d];
  }
  float lse2 = l_all > 0.0f ? m_use + mfa_log2f(l_all) : -MFA_INF;
  o = l_all > 0.0f ? o / l_all : 0.0f;
  if (SINKS) {
    // sink logit in the denominator only: rescale the output by the new normaliser
    const float sink2 = sinks[h] * LOG2E;
    const float top = mfa_fmaxf(lse2, sink2);
    const float total = top + mfa_log2f(mfa_exp2f(lse2 - top) + mfa_exp2f(sink2 - top));
    o *= mfa_exp2f(lse2 - total);
    lse2 = total;
  }
  const long orow = long(b * H + h) * NQ + i;
  out[orow * D + d] = static_cast<T>(o);
  if (d == 0) lse[orow] = lse2 == -MFA_INF ? -MFA_INF : lse2 / LOG2E;
}
