// attention_bwd_dkdv: dk = scale · dSᵀ·q and dv = Pᵀ·dout (FlashAttention-2 backward, the
// key-side half), summed over the query heads that share each key/value head (GQA); dS as in
// attention_bwd_dq.metal, over the kept band only.
//
// Kernel body only (see attention_fwd.metal).  One threadgroup per (key tile, key/value head,
// batch); it walks the query tiles of every query head of its group and recomputes, transposed,
// Pᵀ = exp(scale·k·qᵀ − lse) and dPᵀ = v·doutᵀ, so each warp owns BK/NW key rows of dk and dv.
//   inputs:   q, dout (B, H, NQ, D), k, v (B, HKV, NK, D) in T, lse, delta (B, H, NQ) float32,
//             params int32 [H, HKV, NQ, NK, LEFT, RIGHT, HAS_SINKS, SLOPES_PER_BATCH],
//             fparams float32 (see band.h: Scores), slopes (1|B, H) float32
//   outputs:  dk, dv (B, HKV, NK, D) in T
//   template: T, D, BQ, BK, NW, STAGES (query tiles in flight), SMEM, SOFTCAP, ALIBI (0/1)
//   grid (ceil(NK/BK)·32·NW, HKV, B), threadgroup (32·NW, 1, 1)
using namespace mfa;
constexpr int NT = 32 * NW;
constexpr int WM = BK / NW;  // key rows per warp
constexpr int LD = D + 8;
constexpr int QSTAGE = 2 * BQ * LD * int(sizeof(T)) + 2 * BQ * 4;  // bytes of Q, dO, lse, delta
static_assert(WM % kFragRows == 0, "BK/NW must be a multiple of the fragment height");
static_assert(SMEM >= 2 * BK * LD * int(sizeof(T)) + STAGES * QSTAGE, "SMEM too small");

const int kt = int(threadgroup_position_in_grid.x);
const int hk = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);
const int tid = int(thread_index_in_threadgroup);
const int warp = tid / 32;
const LaneCoord lc = lane_coord(tid % 32);

const int H = params[0], HKV = params[1], NQ = params[2], NK = params[3];
const Band band = Band::from(NQ, NK, params[4], params[5]);
Scores<SOFTCAP, ALIBI> sc = Scores<SOFTCAP, ALIBI>::from(fparams[0], fparams[2], fparams[3], 0.0f, NK - NQ);
const float scale = fparams[1];
const int k0 = kt * BK;
const int k1 = k0 + BK < NK ? k0 + BK : NK;
const int group = H / HKV;

MFA_SHARED(smem, SMEM);
MFA_TG T* sK = reinterpret_cast<MFA_TG T*>(smem);
MFA_TG T* sV = sK + BK * LD;
MFA_TG unsigned char* sStages = smem + 2 * BK * LD * int(sizeof(T));  // STAGES x (Q, dO, lse, delta)

const long kv_base = long(b * HKV + hk) * NK + k0;
copy_tile_async<BK, D, NT>(sK, LD, k + kv_base * D, D, NK - k0, tid);
copy_tile_async<BK, D, NT>(sV, LD, v + kv_base * D, D, NK - k0, tid);
mfa_async_commit();

// Query tiles that see any key of this tile, for every query head of the group: work item w
// is (head g = w / nq, query tile qt_begin + w % nq).
const int q_lo = band.query_lo(k0), q_hi = band.query_hi(k1);
const int qt_begin = q_lo / BQ;
const int nq = q_hi > q_lo ? (q_hi + BQ - 1) / BQ - qt_begin : 0;
const int nwork = group * nq;

Acc<WM, D> dk, dv;
dk.zero();
dv.zero();
MFA_TG const T* sKw = sK + warp * WM * LD;
MFA_TG const T* sVw = sV + warp * WM * LD;
const int key0 = k0 + warp * WM;

// Iteration w computes work item w while items w+1 .. w+STAGES-1 are in flight.
for (int w = 1 - STAGES; w < nwork; ++w) {
  const int wn = w + STAGES - 1;
  if (wn < nwork) {
    const int q0 = (qt_begin + wn % nq) * BQ;
    const long rows = long(b * H + hk * group + wn / nq) * NQ + q0;
    MFA_TG unsigned char* stage = sStages + (wn % STAGES) * QSTAGE;
    MFA_TG T* dQ = reinterpret_cast<MFA_TG T*>(stage);
    MFA_TG float* dL = reinterpret_cast<MFA_TG float*>(dQ + 2 * BQ * LD);
    copy_tile_async<BQ, D, NT>(dQ, LD, q + rows * D, D, NQ - q0, tid);
    copy_tile_async<BQ, D, NT>(dQ + BQ * LD, LD, dout + rows * D, D, NQ - q0, tid);
    for (int i = tid; i < BQ; i += NT) {
      const bool valid = q0 + i < NQ;
      dL[i] = valid ? lse[rows + i] * 1.4426950408889634f : 0.0f;  // log2 units
      dL[BQ + i] = valid ? delta[rows + i] : 0.0f;
    }
  }
  mfa_async_commit();
  if (w < 0) continue;
  mfa_async_wait<STAGES - 1>();
  mfa_barrier();
  const int q0 = (qt_begin + w % nq) * BQ;
  if (ALIBI) sc.slope_log2 = slopes[(params[7] != 0 ? b : 0) * H + hk * group + w / nq] * 1.4426950408889634f;
  MFA_TG const unsigned char* stage = sStages + (w % STAGES) * QSTAGE;
  MFA_TG const T* sQ = reinterpret_cast<MFA_TG const T*>(stage);
  MFA_TG const T* sdO = sQ + BQ * LD;
  MFA_TG const float* sLse = reinterpret_cast<MFA_TG const float*>(sQ + 2 * BQ * LD);
  MFA_TG const float* sDelta = sLse + BQ;

  // dPᵀ = v·doutᵀ and the scores k·qᵀ (transposed: this warp's rows are keys)
  Acc<WM, BQ> pt, dst;
  dst.zero();
  mma_abt<D>(dst, sVw, LD, sdO, LD, lc);
  pt.zero();
  mma_abt<D>(pt, sKw, LD, sQ, LD, lc);

  // Pᵀ = exp2(s − lse) (zero outside the band), dSᵀ = Pᵀ ∘ (dPᵀ − delta) · d(softcap)
  const bool inside = band.inside(q0, q0 + BQ, k0, k0 + BK);
  MFA_UNROLL
  for (int i = 0; i < Acc<WM, BQ>::SIZE; ++i) {
    const int c = Acc<WM, BQ>::col(lc, i);
    const int r = q0 + c, j = key0 + Acc<WM, BQ>::row(lc, i);
    const float p = inside || band.keep(r, j) ? mfa_exp2f(sc.log2_score(pt.v[i], r, j) - sLse[c]) : 0.0f;
    dst.v[i] = p * (dst.v[i] - sDelta[c]) * sc.cap_grad(pt.v[i]);
    pt.v[i] = p;
  }

  // dv += Pᵀ·dout, dk += dSᵀ·q
  mma_ab<BQ>(dv, pt, sdO, LD, lc);
  mma_ab<BQ>(dk, dst, sQ, LD, lc);
  mfa_barrier();  // this stage's buffers may now be refilled
}
mfa_async_wait<0>();

MFA_UNROLL
for (int i = 0; i < Acc<WM, D>::SIZE; ++i) dk.v[i] *= scale;
store_acc(dk, dk_out + (kv_base + warp * WM) * D, D, NK - key0, lc);
store_acc(dv, dv_out + (kv_base + warp * WM) * D, D, NK - key0, lc);
