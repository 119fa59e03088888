// decode_split: split-K (flash-decoding) partial attention of a few queries against a KV cache.
//
// Kernel body only (the `source` of mx.fast.metal_kernel / cuda_kernel / the CPU executor); the
// header is the target's prelude plus metal/decode_common.h.  One threadgroup per (split of the
// keys, KV head x query-row chunk, batch row).  The QR query rows of the chunk are the G·NQ rows
// (query head, new token) sharing this KV head (GQA), so every K/V row is read once for all of
// them.  Lanes are grouped by LPR = D / (16 / sizeof(T)): each lane group reads one K row and
// one V row per step with one 16-byte load per lane, RG = NT / LPR rows in flight per step, U
// steps unrolled.  Each group keeps its own online-softmax state; the groups are merged through
// threadgroup memory at the end and the split's normalised output and log2-sum-exp are written.
// decode_merge combines the splits.
//   inputs:   q (B, H, NQ, D) in T; k, v: the cache in T, row contiguous, addressed by strides:
//               contiguous row b, head h, token j at  b·s_outer + h·s_head + j·s_row
//               paged (PAGE > 0): token j of row b in page p = table[b, j / PAGE], at
//                                 p·s_outer + h·s_head + (j % PAGE)·s_row
//             seqlens (B,) int32, table (B, TABLE_W) int32 (paged; -1 = unused), slopes (B|1, H) float32
//             (ALiBi), params int32 [H, HKV, NQ, QC, S, SPLIT, WL, WR, s_outer, s_head, s_row,
//             NUM_PAGES, TABLE_W, SLOPE_B, NKV], fparams float32 [scale, softcap]
//   outputs:  o_part (B, HKV, QC, S, QR, D) float32, lse_part (B, HKV, QC, S, QR) float32, log2 units
//             (-inf for a row of the split with no visible key, whose o_part is 0)
//   template: T, KIND (0 f32, 1 f16, 2 bf16), D, QR, NT, U, PAGE (0 = contiguous), SOFTCAP, ALIBI, SMEM
//   grid (S·NT, HKV·QC, B), threadgroup (NT, 1, 1)
// Query i of NQ sits at position p = seqlen − NQ + i; key j is visible when j < seqlen,
// j <= p + WR (WR >= 0) and j >= p − WL (WL >= 0); causal is WR = 0.
// Bounds: tokens past min(seqlen, capacity) and table entries outside [0, NUM_PAGES) are never read.
constexpr int VEC = 16 / int(sizeof(T));  // elements per 16-byte load
constexpr int LPR = D / VEC;              // lanes per K/V row
constexpr int RG = NT / LPR;              // K/V rows per step (one per lane group)
constexpr float LOG2E = 1.4426950408889634f;
static_assert(D % VEC == 0 && LPR <= 32 && 32 % LPR == 0 && NT % 32 == 0, "D must be VEC·2^k <= 32·VEC");
static_assert(SMEM >= (RG * QR * (D + 2)) * 4, "SMEM too small");

const int s = int(threadgroup_position_in_grid.x);
const int QC = params[3];
const int kvh = int(threadgroup_position_in_grid.y) / QC;
const int qc = int(threadgroup_position_in_grid.y) % QC;
const int b = int(threadgroup_position_in_grid.z);
const int tid = int(thread_index_in_threadgroup);
const int lane = tid % LPR, grp = tid / LPR;

const int H = params[0], HKV = params[1], NQ = params[2], S = params[4], SPLIT = params[5];
const int WL = params[6], WR = params[7];
const long s_outer = params[8], s_head = params[9], s_row = params[10];
const int NUM_PAGES = params[11], TABLE_W = params[12], SLOPE_B = params[13], NKV = params[14];
const int G = H / HKV, GQ = G * NQ;
const int capacity = PAGE > 0 ? TABLE_W * PAGE : NKV;
const int n_raw = seqlens[b] < capacity ? seqlens[b] : capacity;
const int n = n_raw > 0 ? n_raw : 0;

// the query rows of this chunk, pre-scaled (log2 units unless softcap needs natural ones)
const float qscale = SOFTCAP ? fparams[0] : fparams[0] * LOG2E;
const float cap = fparams[1];
float qv[QR][VEC];
int qpos[QR];
float slope[QR];
bool row_ok[QR];
MFA_UNROLL
for (int r = 0; r < QR; ++r) {
  const int row = qc * QR + r;
  row_ok[r] = row < GQ;
  const int rr = row_ok[r] ? row : 0;
  const int h = kvh * G + rr / NQ, i = rr % NQ;
  qpos[r] = n - NQ + i;
  MFA_DEV const T* qp = q + (long(b * H + h) * NQ + i) * D + lane * VEC;
  MFA_UNROLL
  for (int e = 0; e < VEC; ++e) qv[r][e] = float(qp[e]) * qscale;
  slope[r] = ALIBI ? slopes[long(b) * SLOPE_B + h] * LOG2E : 0.0f;
}

// keys of this split; those left of every query's window are skipped
int lo = s * SPLIT;
const int hi = lo + SPLIT < n ? lo + SPLIT : n;
if (WL >= 0 && lo < n - NQ - WL) lo = n - NQ - WL;

float m[QR], l[QR], acc[QR][VEC];  // online softmax of this lane group: max (log2), sum, output
MFA_UNROLL
for (int r = 0; r < QR; ++r) {
  m[r] = -MFA_INF;
  l[r] = 0.0f;
  MFA_UNROLL
  for (int e = 0; e < VEC; ++e) acc[r][e] = 0.0f;
}

// every lane group runs the same number of steps, so the shuffles below stay converged
for (int base = lo; base < hi; base += RG * U) {
  // issue the U K and V loads of this step (bounds- and page-checked) before any math
  DecodeWord kw[U], vw[U];
  bool ok[U];
  int jj[U];
  MFA_UNROLL
  for (int u = 0; u < U; ++u) {
    const int j = base + u * RG + grp;
    jj[u] = j;
    ok[u] = j < hi;
    // invalid rows read a valid one (row lo, page 0) and are zeroed: loads need no branch
    long off;
    if (PAGE > 0) {
      const int page = table[long(b) * TABLE_W + (ok[u] ? j : lo) / (PAGE > 0 ? PAGE : 1)];
      ok[u] = ok[u] && page >= 0 && page < NUM_PAGES;
      off = long(ok[u] ? page : 0) * s_outer + long((ok[u] ? j : 0) % (PAGE > 0 ? PAGE : 1)) * s_row;
    } else {
      off = long(b) * s_outer + long(ok[u] ? j : lo) * s_row;
    }
    off += long(kvh) * s_head + lane * VEC;
    kw[u] = decode_load16(k + off);
    vw[u] = decode_load16(v + off);
    if (!ok[u]) {
      kw[u] = decode_zero_word();
      vw[u] = decode_zero_word();
    }
  }

  // scores: partial dot products of this lane's D-slice, summed over the lane group
  float sc[U][QR];
  MFA_UNROLL
  for (int u = 0; u < U; ++u) {
    float kf[VEC];
    decode_unpack<KIND>(kw[u], kf);
    MFA_UNROLL
    for (int r = 0; r < QR; ++r) {
      float dot = 0.0f;
      MFA_UNROLL
      for (int e = 0; e < VEC; ++e) dot += qv[r][e] * kf[e];
      sc[u][r] = dot;
    }
  }
  MFA_UNROLL
  for (int off = LPR / 2; off >= 1; off /= 2) {
    MFA_UNROLL
    for (int u = 0; u < U; ++u) {
      MFA_UNROLL
      for (int r = 0; r < QR; ++r) sc[u][r] += mfa_shfl_xor(sc[u][r], off);
    }
  }

  // softcap, ALiBi, masks (log2 units from here on); a step every row sees whole skips the position tests
  const bool full = base + RG * U <= hi && (WR < 0 || base + RG * U - 1 <= n - NQ + WR) &&
                    (WL < 0 || base >= n - 1 - WL);
  MFA_UNROLL
  for (int u = 0; u < U; ++u) {
    MFA_UNROLL
    for (int r = 0; r < QR; ++r) {
      float x = sc[u][r];
      if (SOFTCAP) x = cap * LOG2E * decode_tanh(x / cap);
      const int d = qpos[r] - jj[u];
      if (ALIBI) x -= slope[r] * float(d < 0 ? -d : d);
      const bool keep = ok[u] && (full || (row_ok[r] && (WR < 0 || -d <= WR) && (WL < 0 || d <= WL)));
      sc[u][r] = keep ? x : -MFA_INF;
    }
  }

  // online softmax: one rescale per step, then accumulate p·v
  MFA_UNROLL
  for (int r = 0; r < QR; ++r) {
    float m_new = m[r];
    MFA_UNROLL
    for (int u = 0; u < U; ++u) m_new = mfa_fmaxf(m_new, sc[u][r]);
    const float m_use = m_new == -MFA_INF ? 0.0f : m_new;
    const float corr = mfa_exp2f(m[r] - m_use);
    l[r] *= corr;
    MFA_UNROLL
    for (int e = 0; e < VEC; ++e) acc[r][e] *= corr;
    m[r] = m_new;
  }
  MFA_UNROLL
  for (int u = 0; u < U; ++u) {
    float vf[VEC];
    decode_unpack<KIND>(vw[u], vf);
    MFA_UNROLL
    for (int r = 0; r < QR; ++r) {
      const float p = mfa_exp2f(sc[u][r] - (m[r] == -MFA_INF ? 0.0f : m[r]));
      l[r] += p;
      MFA_UNROLL
      for (int e = 0; e < VEC; ++e) acc[r][e] += p * vf[e];
    }
  }
}

// merge the lane groups' states through threadgroup memory
MFA_SHARED(smem, SMEM);
MFA_TG float* sm_acc = reinterpret_cast<MFA_TG float*>(smem);  // [RG][QR][D]
MFA_TG float* sm_m = sm_acc + RG * QR * D;                       // [RG][QR]
MFA_TG float* sm_l = sm_m + RG * QR;                             // [RG][QR]
MFA_UNROLL
for (int r = 0; r < QR; ++r) {
  MFA_UNROLL
  for (int e = 0; e < VEC; ++e) sm_acc[(grp * QR + r) * D + lane * VEC + e] = acc[r][e];
  if (lane == 0) {
    sm_m[grp * QR + r] = m[r];
    sm_l[grp * QR + r] = l[r];
  }
}
mfa_barrier();
for (int idx = tid; idx < QR * D; idx += NT) {
  const int r = idx / D, dd = idx % D;
  float m_all = -MFA_INF;
  for (int g = 0; g < RG; ++g) m_all = mfa_fmaxf(m_all, sm_m[g * QR + r]);
  const float m_use = m_all == -MFA_INF ? 0.0f : m_all;
  float l_all = 0.0f, o = 0.0f;
  for (int g = 0; g < RG; ++g) {
    const float w = mfa_exp2f(sm_m[g * QR + r] - m_use);
    l_all += sm_l[g * QR + r] * w;
    o += sm_acc[(g * QR + r) * D + dd] * w;
  }
  const long orow = ((long(b * HKV + kvh) * QC + qc) * S + s) * QR + r;
  o_part[orow * D + dd] = l_all > 0.0f ? o / l_all : 0.0f;
  if (dd == 0) lse_part[orow] = l_all > 0.0f ? m_use + mfa_log2f(l_all) : -MFA_INF;
}
