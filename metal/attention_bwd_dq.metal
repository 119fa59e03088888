// attention_bwd_dq: dq = scale · dS·k with dS = P ∘ (dP − delta) (times 1 − tanh² under
// softcap), P = exp(s − lse), dP = dout·vᵀ (FlashAttention-2 backward, the query-side half).
//
// Kernel body only (see attention_fwd.metal).  One threadgroup per (query tile, head, batch);
// it recomputes P from lse over the key tiles of its band, so nothing of size NQ x NK is stored.
//   inputs:   q, dout (B, H, NQ, D), k, v (B, HKV, NK, D) in T, lse, delta (B, H, NQ) float32,
//             params int32 [H, HKV, NQ, NK, LEFT, RIGHT, HAS_SINKS, SLOPES_PER_BATCH],
//             fparams float32 (see band.h: Scores), slopes (1|B, H) float32
//   outputs:  dq (B, H, NQ, D) in T; with ALIBI, dslopes_part (B, H, ceil(NQ/BQ)) float32: this
//             tile's share of dL/dslope = Σ dS·(−|j − i'|)
//   template: T, D, BQ, BK, NW, STAGES, SMEM, SOFTCAP, ALIBI (0/1)
//   grid (ceil(NQ/BQ)·32·NW, H, B), threadgroup (32·NW, 1, 1)
using namespace mfa;
constexpr int NT = 32 * NW;
constexpr int WM = BQ / NW;  // query rows per warp
constexpr int LD = D + 8;
static_assert(WM % kFragRows == 0, "BQ/NW must be a multiple of the fragment height");
static_assert(SMEM >= (2 * BQ + 2 * STAGES * BK) * LD * int(sizeof(T)), "SMEM too small");

const int h = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);
const int tid = int(thread_index_in_threadgroup);
const int warp = tid / 32;
const LaneCoord lc = lane_coord(tid % 32);

const int H = params[0], HKV = params[1], NQ = params[2], NK = params[3];
const Band band = Band::from(NQ, NK, params[4], params[5]);
const float slope = ALIBI ? slopes[(params[7] != 0 ? b : 0) * H + h] : 0.0f;
const Scores<SOFTCAP, ALIBI> sc = Scores<SOFTCAP, ALIBI>::from(fparams[0], fparams[2], fparams[3], slope, NK - NQ);
const float scale = fparams[1];
const int nqt = (NQ + BQ - 1) / BQ;
const int qt = band.right < kUnbounded ? nqt - 1 - int(threadgroup_position_in_grid.x)
                                       : int(threadgroup_position_in_grid.x);
const int q0 = qt * BQ;
const int q1 = q0 + BQ < NQ ? q0 + BQ : NQ;
const int hk = h / (H / HKV);

MFA_SHARED(smem, SMEM);
MFA_TG T* sQ = reinterpret_cast<MFA_TG T*>(smem);
MFA_TG T* sdO = sQ + BQ * LD;
MFA_TG T* sKV = sdO + BQ * LD;  // STAGES x (K tile, V tile)
MFA_DEV const T* Kg = k + long(b * HKV + hk) * NK * D;
MFA_DEV const T* Vg = v + long(b * HKV + hk) * NK * D;
const long row_base = long(b * H + h) * NQ + q0;

const int kv_lo = band.key_lo(q0), kv_hi = band.key_hi(q1);
const int t_first = kv_lo / BK;
const int ntiles = kv_hi > kv_lo ? (kv_hi + BK - 1) / BK - t_first : 0;

copy_tile_async<BQ, D, NT>(sQ, LD, q + row_base * D, D, NQ - q0, tid);
copy_tile_async<BQ, D, NT>(sdO, LD, dout + row_base * D, D, NQ - q0, tid);
mfa_async_commit();

const int row0 = q0 + warp * WM;
RowVec<WM> lse_rows, delta_rows;
load_rows(lse_rows, lse + row_base + warp * WM, NQ - row0, 0.0f, lc);
load_rows(delta_rows, delta + row_base + warp * WM, NQ - row0, 0.0f, lc);
MFA_UNROLL
for (int r = 0; r < RowVec<WM>::SIZE; ++r) lse_rows.v[r] *= 1.4426950408889634f;  // to log2 units

Acc<WM, D> dq;
dq.zero();
float dslope = 0.0f;  // this thread's share of dL/dslope
MFA_TG const T* sQw = sQ + warp * WM * LD;
MFA_TG const T* sdOw = sdO + warp * WM * LD;

for (int t = 1 - STAGES; t < ntiles; ++t) {
  const int tn = t + STAGES - 1;
  if (tn < ntiles) {
    const int kn = (t_first + tn) * BK;
    MFA_TG T* dst = sKV + (tn % STAGES) * 2 * BK * LD;
    copy_tile_async<BK, D, NT>(dst, LD, Kg + long(kn) * D, D, NK - kn, tid);
    copy_tile_async<BK, D, NT>(dst + BK * LD, LD, Vg + long(kn) * D, D, NK - kn, tid);
  }
  mfa_async_commit();
  if (t < 0) continue;
  mfa_async_wait<STAGES - 1>();
  mfa_barrier();
  MFA_TG const T* sK = sKV + (t % STAGES) * 2 * BK * LD;
  MFA_TG const T* sV = sK + BK * LD;
  const int k0 = (t_first + t) * BK;

  // dP = dout·vᵀ and the scores q·kᵀ
  Acc<WM, BK> ds, s;
  ds.zero();
  mma_abt<D>(ds, sdOw, LD, sV, LD, lc);
  s.zero();
  mma_abt<D>(s, sQw, LD, sK, LD, lc);

  // P = exp2(s − lse) (zero outside the band), dS = P ∘ (dP − delta) · d(softcap)
  const bool inside = band.inside(q0, q1, k0, k0 + BK);
  MFA_UNROLL
  for (int i = 0; i < Acc<WM, BK>::SIZE; ++i) {
    const int slot = Acc<WM, BK>::slot(i);
    const int r = row0 + Acc<WM, BK>::row(lc, i), j = k0 + Acc<WM, BK>::col(lc, i);
    const bool keep = inside || band.keep(r, j);
    const float p = keep ? mfa_exp2f(sc.log2_score(s.v[i], r, j) - lse_rows.v[slot]) : 0.0f;
    const float g = p * (ds.v[i] - delta_rows.v[slot]);  // dL/d(score)
    if (ALIBI) dslope += g * sc.alibi_grad(r, j);
    ds.v[i] = g * sc.cap_grad(s.v[i]);
  }

  // dq += dS·k
  mma_ab<BK>(dq, ds, sK, LD, lc);
  mfa_barrier();
}
mfa_async_wait<0>();

MFA_UNROLL
for (int i = 0; i < Acc<WM, D>::SIZE; ++i) dq.v[i] *= scale;
store_acc(dq, dq_out + (row_base + warp * WM) * D, D, NQ - row0, lc);

if (ALIBI) {
  // reduce dL/dslope over the threadgroup: lanes by shuffles, warps through shared memory
  for (int m = 16; m > 0; m /= 2) dslope += mfa_shfl_xor(dslope, m);
  mfa_barrier();  // every thread's copies have landed and no warp still reads the tiles
  MFA_TG float* red = reinterpret_cast<MFA_TG float*>(smem);
  if (tid % 32 == 0) red[warp] = dslope;
  mfa_barrier();
  if (tid == 0) {
    float total = 0.0f;
    for (int w = 0; w < NW; ++w) total += red[w];
    dslopes_part[long(b * H + h) * nqt + qt] = total;
  }
}
