// attention_bwd_preprocess: delta = rowsum(dout ∘ out) − dlse, the per-row term of the backward.
//
// Kernel body only (see attention_fwd.metal).  With P = exp(S − lse), the gradient of the
// scores is dS = P ∘ (dP − delta); dlse, the cotangent of lse, enters as dS += P ∘ dlse, so it
// is folded into delta here.  Each warp reduces one row at a time across its lanes.
//   inputs:   out, dout (B, H, NQ, D) in T, dlse (B, H, NQ) float32, params int32 [H, HKV, NQ, NK, ...]
//   outputs:  delta (B, H, NQ) float32
//   template: T, D, NW, ROWS (rows per threadgroup, a multiple of NW)
//   grid (ceil(NQ/ROWS)·32·NW, H, B), threadgroup (32·NW, 1, 1)
const int tile = int(threadgroup_position_in_grid.x);
const int h = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);
const int tid = int(thread_index_in_threadgroup);
const int warp = tid / 32, lane = tid % 32;
const int H = params[0], NQ = params[2];

for (int rr = warp; rr < ROWS; rr += NW) {
  const int row = tile * ROWS + rr;
  const bool valid = row < NQ;  // uniform per warp: whole warps skip, shuffles stay converged
  if (!valid) continue;
  const long base = (long(b * H + h) * NQ + row) * D;
  float acc = 0.0f;
  for (int d = lane; d < D; d += 32) acc += float(out[base + d]) * float(dout[base + d]);
  acc += mfa_shfl_xor(acc, 16);
  acc += mfa_shfl_xor(acc, 8);
  acc += mfa_shfl_xor(acc, 4);
  acc += mfa_shfl_xor(acc, 2);
  acc += mfa_shfl_xor(acc, 1);
  if (lane == 0) delta[long(b * H + h) * NQ + row] = acc - dlse[long(b * H + h) * NQ + row];
}
