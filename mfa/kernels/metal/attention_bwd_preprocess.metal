// attention_bwd_preprocess: delta = rowsum(dout ∘ out) − dlse, the per-row term of the backward.
//
// Kernel body only (see attention_fwd.metal).  With P = exp(S − lse), the gradient of the
// scores is dS = P ∘ (dP − delta); dlse, the cotangent of lse, enters as dS += P ∘ dlse, so it
// is folded into delta here.  Each warp reduces ROWS/NW rows across its lanes, their loads issued
// together.
//   inputs:   out, dout (B, H, NQ, D) in T, dlse (B, H, NQ) float32 (read with DLSE = 1, else taken
//             as zero), params int32 [H, HKV, NQ, NK, ...]
//   outputs:  delta (B, H, NQ) float32
//   template: T, D, NW, ROWS (rows per threadgroup, a multiple of NW), DLSE
//   grid (ceil(NQ/ROWS)·32·NW, H, B), threadgroup (32·NW, 1, 1)
constexpr int RPW = ROWS / NW;  // rows per warp
const int tile = int(threadgroup_position_in_grid.x);
const int h = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);
const int tid = int(thread_index_in_threadgroup);
const int warp = tid / 32, lane = tid % 32;
const int H = params[0], NQ = params[2];
const long head = long(b * H + h) * NQ;
const int row0 = tile * ROWS + warp * RPW;

float acc[RPW];
MFA_UNROLL
for (int i = 0; i < RPW; ++i) {
  acc[i] = 0.0f;
  if (row0 + i < NQ) {
    const long base = (head + row0 + i) * D;
    MFA_UNROLL
    for (int d = lane; d < D; d += 32) acc[i] += float(out[base + d]) * float(dout[base + d]);
  }
}
MFA_UNROLL
for (int i = 0; i < RPW; ++i) {
  for (int m = 16; m > 0; m /= 2) acc[i] += mfa_shfl_xor(acc[i], m);
  if (lane == 0 && row0 + i < NQ) delta[head + row0 + i] = acc[i] - (DLSE ? dlse[head + row0 + i] : 0.0f);
}
