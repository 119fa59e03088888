// decode_split_mma: decode_split on tensor cores (CUDA mma.sync m16n8k16; the CPU executor's CUDA family).
//
// Kernel body only.  Same inputs, outputs, params and grid as decode_split.metal (decode_merge combines
// the splits), for T = half/bfloat16 and D = 64 or 128.  Each warp takes blocks of 16 keys; the QR
// (<= 16) query rows of its threadgroup are the M rows of the products (padded to 16):
//   S (16 x 16 keys) = Q · Kᵀ     D/16 k-blocks x 2 n-tiles of m16n8k16
//   O (16 x D)      += P · V      one k-block (the 16 keys) x D/8 n-tiles, P reused from S in registers
// Operands come straight from global memory with 16-byte loads, no shared memory: a dot product may
// sum its d's in any order, so lane (g, q) = (lane/4, lane%4) takes the 8 consecutive d's of chunk
// 4i + q as its k pairs of k-blocks 2i and 2i+1, in Q's A fragment and K's B fragment alike; and the
// output columns may be permuted, so n-tile j, column n of O is d = (j/8)·64 + n·8 + j%8, which makes
// the V operand of lane (g, q) the 16-byte words at d = c·64 + g·8 of keys 2q, 2q+1, 2q+8, 2q+9.
//   template: T, D, QR, NW (warps), PAGE (0 = contiguous), SOFTCAP, ALIBI, SMEM
//   grid (S·32·NW, HKV·QC, B), threadgroup (32·NW, 1, 1)
// Bounds: rows past min(seqlen, capacity) and table entries outside [0, NUM_PAGES) are never read
// (their address is clamped to a valid row, their words replaced by zeros, their scores masked).
constexpr int NT = 32 * NW;
constexpr int KB = D / 16;  // k-blocks of Q·Kᵀ
constexpr int NJ = D / 8;   // n-tiles of P·V
constexpr int KL = D / 32;  // 16-byte K words per lane and key (4 lanes share a key)
constexpr int VL = D / 64;  // 16-byte V words per lane and key (8 lanes share a key)
constexpr float LOG2E = 1.4426950408889634f;
static_assert((D == 64 || D == 128) && QR <= 16, "decode_split_mma: D in {64, 128}, at most 16 rows");
static_assert(SMEM >= NW * QR * (D + 2) * 4, "SMEM too small");

const int s = int(threadgroup_position_in_grid.x);
const int QC = params[3];
const int kvh = int(threadgroup_position_in_grid.y) / QC;
const int qc = int(threadgroup_position_in_grid.y) % QC;
const int b = int(threadgroup_position_in_grid.z);
const int tid = int(thread_index_in_threadgroup);
const int warp = tid / 32, lane = tid % 32, g = lane / 4, qd = lane % 4;

const int H = params[0], HKV = params[1], NQ = params[2], S = params[4], SPLIT = params[5];
const int WL = params[6], WR = params[7];
const long s_outer = params[8], s_head = params[9], s_row = params[10];
const int NUM_PAGES = params[11], TABLE_W = params[12], SLOPE_B = params[13], NKV = params[14];
const int G = H / HKV, GQ = G * NQ;
const int capacity = PAGE > 0 ? TABLE_W * PAGE : NKV;
const int n_raw = seqlens[b] < capacity ? seqlens[b] : capacity;
const int n = n_raw > 0 ? n_raw : 0;
const float qscale = SOFTCAP ? fparams[0] : fparams[0] * LOG2E;
const float cap = fparams[1];

// this lane's two rows (g, g + 8) and Q as A fragments: qa[kb][hh] row g + 8hh, k pair 2q; [2 + hh] pair 2q + 8
int qpos[2];
bool row_ok[2];
float slope[2];
unsigned qa[KB][4];
MFA_UNROLL
for (int hh = 0; hh < 2; ++hh) {
  const int row = g + 8 * hh, rowg = qc * QR + row;
  row_ok[hh] = row < QR && rowg < GQ;
  const int rr = row_ok[hh] ? rowg : 0;
  const int h = kvh * G + rr / NQ, i = rr % NQ;
  qpos[hh] = n - NQ + i;
  slope[hh] = ALIBI ? slopes[long(b) * SLOPE_B + h] * LOG2E : 0.0f;
  MFA_DEV const T* qrow = q + (long(b * H + h) * NQ + i) * D;
  MFA_UNROLL
  for (int c = 0; c < KL; ++c) {
    DecodeWord w = decode_load16(qrow + (4 * c + qd) * 8);
    if (!row_ok[hh]) w = decode_zero_word();
    qa[2 * c][hh] = w.x;
    qa[2 * c][2 + hh] = w.y;
    qa[2 * c + 1][hh] = w.z;
    qa[2 * c + 1][2 + hh] = w.w;
  }
}

int lo = s * SPLIT;
const int hi = lo + SPLIT < n ? lo + SPLIT : n;
if (WL >= 0 && lo < n - NQ - WL) lo = n - NQ - WL;

float m_run[2] = {-MFA_INF, -MFA_INF}, l_run[2] = {0.0f, 0.0f};  // per row; l is this lane's share
float o[NJ][4];
MFA_UNROLL
for (int j = 0; j < NJ; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;

// warp-uniform loop: each warp owns every NW-th block of 16 keys
for (int base = lo + 16 * warp; base < hi; base += 16 * NW) {
  // K rows base + 8t + g (B fragments of the two n-tiles); V rows base + 2q + {0, 1, 8, 9}
  unsigned kf[2][KB][2];
  DecodeWord vw[4][VL];
  bool v_ok[4];
  MFA_UNROLL
  for (int t = 0; t < 6; ++t) {
    const int j = t < 2 ? base + 8 * t + g : base + 2 * qd + ((t - 2) & 1) + 8 * ((t - 2) >> 1);
    bool ok = j < hi;
    long off;
    if (PAGE > 0) {
      const int page = table[long(b) * TABLE_W + (ok ? j : lo) / (PAGE > 0 ? PAGE : 1)];
      ok = ok && page >= 0 && page < NUM_PAGES;
      off = long(ok ? page : 0) * s_outer + long((ok ? j : 0) % (PAGE > 0 ? PAGE : 1)) * s_row;
    } else {
      off = long(b) * s_outer + long(ok ? j : lo) * s_row;
    }
    off += long(kvh) * s_head;
    if (t < 2) {
      MFA_UNROLL
      for (int c = 0; c < KL; ++c) {
        DecodeWord w = decode_load16(k + off + (4 * c + qd) * 8);
        if (!ok) w = decode_zero_word();
        kf[t][2 * c][0] = w.x;
        kf[t][2 * c][1] = w.y;
        kf[t][2 * c + 1][0] = w.z;
        kf[t][2 * c + 1][1] = w.w;
      }
    } else {
      v_ok[t - 2] = ok;
      MFA_UNROLL
      for (int c = 0; c < VL; ++c) {
        vw[t - 2][c] = decode_load16(v + off + c * 64 + g * 8);
        if (!ok) vw[t - 2][c] = decode_zero_word();
      }
    }
  }

  // S = Q · Kᵀ: element e of n-tile t is row g + 8(e/2), key base + 8t + 2q + e%2
  float sc[2][4];
  MFA_UNROLL
  for (int t = 0; t < 2; ++t) {
    sc[t][0] = sc[t][1] = sc[t][2] = sc[t][3] = 0.0f;
    MFA_UNROLL
    for (int kb = 0; kb < KB; ++kb) mfa_mma16816<T>(sc[t], qa[kb], kf[t][kb]);
  }

  // scale, softcap, ALiBi, masks; a block every row sees whole skips the position tests
  const bool full = base + 16 <= hi && (WR < 0 || base + 15 <= n - NQ + WR) && (WL < 0 || base >= n - 1 - WL);
  MFA_UNROLL
  for (int t = 0; t < 2; ++t) {
    MFA_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int hh = e / 2, key = base + 8 * t + 2 * qd + (e & 1);
      float x = sc[t][e] * qscale;
      if (SOFTCAP) x = cap * LOG2E * decode_tanh(x / cap);
      const int d = qpos[hh] - key;
      if (ALIBI) x -= slope[hh] * float(d < 0 ? -d : d);
      const bool keep = v_ok[2 * t + (e & 1)] &&
                        (full || (row_ok[hh] && (WR < 0 || -d <= WR) && (WL < 0 || d <= WL)));
      sc[t][e] = keep ? x : -MFA_INF;
    }
  }

  // online softmax per row: max over the 16 keys (4 lanes x 4 values), rescale, P = 2^(S - m)
  float m_use[2];
  MFA_UNROLL
  for (int hh = 0; hh < 2; ++hh) {
    float mx = mfa_fmaxf(mfa_fmaxf(sc[0][2 * hh], sc[0][2 * hh + 1]), mfa_fmaxf(sc[1][2 * hh], sc[1][2 * hh + 1]));
    mx = mfa_fmaxf(mx, mfa_shfl_xor(mx, 1));
    mx = mfa_fmaxf(mx, mfa_shfl_xor(mx, 2));
    const float m_new = mfa_fmaxf(m_run[hh], mx);
    m_use[hh] = m_new == -MFA_INF ? 0.0f : m_new;
    const float corr = mfa_exp2f(m_run[hh] - m_use[hh]);
    l_run[hh] *= corr;
    MFA_UNROLL
    for (int j = 0; j < NJ; ++j) {
      o[j][2 * hh] *= corr;
      o[j][2 * hh + 1] *= corr;
    }
    m_run[hh] = m_new;
  }
  float p[2][4];
  MFA_UNROLL
  for (int t = 0; t < 2; ++t) {
    MFA_UNROLL
    for (int e = 0; e < 4; ++e) {
      p[t][e] = mfa_exp2f(sc[t][e] - m_use[e / 2]);
      l_run[e / 2] += p[t][e];
    }
  }
  // P as the A fragment of the key k-block: tile 0 gives k pairs 2q, tile 1 pairs 2q + 8
  const unsigned pa[4] = {mfa_pack2<T>(p[0][0], p[0][1]), mfa_pack2<T>(p[0][2], p[0][3]),
                          mfa_pack2<T>(p[1][0], p[1][1]), mfa_pack2<T>(p[1][2], p[1][3])};

  // O += P · V: B fragment of n-tile j = the halves (j%2) of word (j%8)/2 of keys (2q, 2q+1), (2q+8, 2q+9)
  MFA_UNROLL
  for (int j = 0; j < NJ; ++j) {
    const int c = j / 8, word = (j % 8) / 2;
    unsigned vb[2];
    MFA_UNROLL
    for (int pair = 0; pair < 2; ++pair) {
      const DecodeWord w0 = vw[2 * pair][c], w1 = vw[2 * pair + 1][c];
      const unsigned a = word == 0 ? w0.x : word == 1 ? w0.y : word == 2 ? w0.z : w0.w;
      const unsigned z = word == 0 ? w1.x : word == 1 ? w1.y : word == 2 ? w1.z : w1.w;
      vb[pair] = (j & 1) ? ((a >> 16) | (z & 0xffff0000u)) : ((a & 0xffffu) | (z << 16));
    }
    mfa_mma16816<T>(o[j], pa, vb);
  }
}

// row sums over the 4 lanes of each row, then merge the warps through threadgroup memory
MFA_UNROLL
for (int hh = 0; hh < 2; ++hh) {
  l_run[hh] += mfa_shfl_xor(l_run[hh], 1);
  l_run[hh] += mfa_shfl_xor(l_run[hh], 2);
}
MFA_SHARED(smem, SMEM);
MFA_TG float* sm_acc = reinterpret_cast<MFA_TG float*>(smem);  // [NW][QR][D]
MFA_TG float* sm_m = sm_acc + NW * QR * D;                       // [NW][QR]
MFA_TG float* sm_l = sm_m + NW * QR;                             // [NW][QR]
MFA_UNROLL
for (int j = 0; j < NJ; ++j) {
  MFA_UNROLL
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2);
    if (row < QR) sm_acc[(warp * QR + row) * D + (j / 8) * 64 + (2 * qd + (e & 1)) * 8 + j % 8] = o[j][e];
  }
}
MFA_UNROLL
for (int hh = 0; hh < 2; ++hh) {
  const int row = g + 8 * hh;
  if (qd == 0 && row < QR) {
    sm_m[warp * QR + row] = m_run[hh];
    sm_l[warp * QR + row] = l_run[hh];
  }
}
mfa_barrier();
for (int idx = tid; idx < QR * D; idx += NT) {
  const int r = idx / D, dd = idx % D;
  float m_all = -MFA_INF;
  for (int w = 0; w < NW; ++w) m_all = mfa_fmaxf(m_all, sm_m[w * QR + r]);
  const float m_all_use = m_all == -MFA_INF ? 0.0f : m_all;
  float l_all = 0.0f, acc = 0.0f;
  for (int w = 0; w < NW; ++w) {
    const float f = mfa_exp2f(sm_m[w * QR + r] - m_all_use);
    l_all += sm_l[w * QR + r] * f;
    acc += sm_acc[(w * QR + r) * D + dd] * f;
  }
  const long orow = ((long(b * HKV + kvh) * QC + qc) * S + s) * QR + r;
  o_part[orow * D + dd] = l_all > 0.0f ? acc / l_all : 0.0f;
  if (dd == 0) lse_part[orow] = l_all > 0.0f ? m_all_use + mfa_log2f(l_all) : -MFA_INF;
}
