// The kept band of attention scores, shared by the attention kernels.
//
// Query row i sits at i' = i + NK - NQ (bottom-right alignment); key j is kept when
//   j < NK  and  i' - left <= j <= i' + right
// (causal: right = 0; an unbounded side holds kUnbounded).  The kernels visit only key tiles
// that intersect the band of their query tile (and the reverse in dk/dv), and mask per element
// only on tiles that are not wholly inside it.
namespace mfa {

enum : int { kUnbounded = 1 << 30 };

struct Band {
  int nq, nk, offset, left, right;

  // From the kernels' params: [H, HKV, NQ, NK, LEFT, RIGHT, ...].
  MFA_FUNC static Band from(int NQ, int NK, int left, int right) {
    Band b;
    b.nq = NQ;
    b.nk = NK;
    b.offset = NK - NQ;
    b.left = left;
    b.right = right;
    return b;
  }

  MFA_FUNC bool keep(int i, int j) const {
    const int ip = i + offset;
    return i < nq && j < nk && j >= ip - left && j <= ip + right;
  }
  // Keys [key_lo, key_hi) seen by query rows [r0, r1) (r1 > r0).
  MFA_FUNC int key_lo(int r0) const {
    const int lo = r0 + offset - left;
    return lo > 0 ? lo : 0;
  }
  MFA_FUNC int key_hi(int r1) const {
    const int hi = r1 - 1 + offset + right + 1;
    return hi < nk ? hi : nk;
  }
  // Query rows [query_lo, query_hi) that see any of keys [k0, k1) (k1 > k0).
  MFA_FUNC int query_lo(int k0) const {
    const int lo = k0 - right - offset;
    return lo > 0 ? lo : 0;
  }
  MFA_FUNC int query_hi(int k1) const {
    const int hi = k1 - 1 + left - offset + 1;
    return hi < nq ? hi : nq;
  }
  // Whether every (row in [r0, r1), key in [k0, k1)) pair is kept: no per-element mask needed.
  MFA_FUNC bool inside(int r0, int r1, int k0, int k1) const {
    return r1 <= nq && k1 <= nk && k0 >= r1 - 1 + offset - left && k1 - 1 <= r0 + offset + right;
  }
};

// The score at (query row i, key j) in log2 units, from x = q·kᵀ:
//   scale·x, softcapped (CAP) to c·tanh(scale·x / c), minus (ALIBI) slope·|j − i'|, times log2(e).
// CAP and ALIBI are template values so plain calls pay nothing for them.
template <int CAP, int ALIBI>
struct Scores {
  float scale_log2, cap_log2, scale_over_cap, slope_log2;
  int offset;

  // From the kernels' fparams [scale·log2(e), scale, softcap·log2(e), scale/softcap], a head's
  // ALiBi slope and NK − NQ.
  MFA_FUNC static Scores from(float scale_log2, float cap_log2, float scale_over_cap, float slope, int offset) {
    Scores s;
    s.scale_log2 = scale_log2;
    s.cap_log2 = cap_log2;
    s.scale_over_cap = scale_over_cap;
    s.slope_log2 = slope * 1.4426950408889634f;
    s.offset = offset;
    return s;
  }
  MFA_FUNC float log2_score(float x, int i, int j) const {
    const float s = CAP ? cap_log2 * mfa_tanhf(x * scale_over_cap) : x * scale_log2;
    return ALIBI ? s + slope_log2 * alibi_grad(i, j) : s;
  }
  // d(score)/d(scale·x): 1, or 1 − tanh² under softcap.
  MFA_FUNC float cap_grad(float x) const {
    if (!CAP) return 1.0f;
    const float t = mfa_tanhf(x * scale_over_cap);
    return 1.0f - t * t;
  }
  // d(score)/d(slope) = −|j − i'|.
  MFA_FUNC float alibi_grad(int i, int j) const {
    const int d = j - i - offset;
    return -float(d < 0 ? -d : d);
  }
};

}  // namespace mfa
