#include "bispectrum.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>

namespace mlsurrogate {

namespace {

constexpr double kPi = 3.14159265358979323846;
constexpr int kMaxTwojmax = 40;  // keeps the factorials of the CG formula finite

[[noreturn]] void bad_setting(const std::string& what) { throw std::invalid_argument(what); }

// Cutoff switching function of SNAP and its radial derivative (Thompson 2015, eq. 5).
void switching(const BispectrumSettings& s, double r, double rcut, double& f, double& df) {
  if (!s.switchflag || r <= s.rmin0) {
    f = 1.0;
    df = 0.0;
    return;
  }
  const double k = kPi / (rcut - s.rmin0);
  f = 0.5 * (std::cos((r - s.rmin0) * k) + 1.0);
  df = -0.5 * std::sin((r - s.rmin0) * k) * k;
}

// Hot loops get an AVX+FMA clone picked at run time by CPU feature (not model, as an
// arch= clone would be), so binaries stay portable without -march=native.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MLS_MULTIVERSION __attribute__((target_clones("fma", "default")))
#else
#define MLS_MULTIVERSION
#endif

// kLanes doubles as one value (GCC/Clang vector extension): one AVX register in the fma
// clone. LanesRef views unaligned memory.
typedef double Lanes __attribute__((vector_size(kLanes * sizeof(double))));
typedef double LanesRef
    __attribute__((vector_size(kLanes * sizeof(double)), aligned(sizeof(double)), may_alias));
static_assert(sizeof(Lanes) == kLanes * sizeof(double), "one Lanes value per U entry");
#define MLS_LOAD(p) (*reinterpret_cast<const LanesRef*>(p))
#define MLS_STORE(p, v) (*reinterpret_cast<LanesRef*>(p) = (v))

// Z^j_{j1 j2}(ma, mb) = sum C(j1 ma1 j2 ma2 | j ma) C(j1 mb1 j2 mb2 | j mb) U1(ma1,mb1) U2(ma2,mb2)
// (Thompson 2015, eq. 9) for mb <= j/2 (the other half follows by symmetry and is never
// needed), for kLanes centres at once; arrays are [mb][ma][lane], cg is [m1][m2].
MLS_MULTIVERSION
void z_lanes(int j1, int j2, int j, const double* cg, const double* u1r, const double* u1i,
             const double* u2r, const double* u2i, double* zr, double* zi) {
  const int c = (j1 + j2 - j) / 2;  // m1 + m2 = m + c
  for (int mb = 0; 2 * mb <= j; ++mb) {
    const int mb1_lo = std::max(0, mb + c - j2), mb1_hi = std::min(j1, mb + c);
    for (int ma = 0; ma <= j; ++ma) {
      const int ma1_lo = std::max(0, ma + c - j2), ma1_hi = std::min(j1, ma + c);
      Lanes acc_r = {}, acc_i = {};
      for (int mb1 = mb1_lo; mb1 <= mb1_hi; ++mb1) {
        const int mb2 = mb + c - mb1;
        const double* row1r = u1r + mb1 * (j1 + 1) * kLanes;
        const double* row1i = u1i + mb1 * (j1 + 1) * kLanes;
        const double* row2r = u2r + mb2 * (j2 + 1) * kLanes;
        const double* row2i = u2i + mb2 * (j2 + 1) * kLanes;
        Lanes sr = {}, si = {};
        for (int ma1 = ma1_lo; ma1 <= ma1_hi; ++ma1) {
          const int ma2 = ma + c - ma1;
          const double g = cg[ma1 * (j2 + 1) + ma2];
          const Lanes ar = g * MLS_LOAD(row1r + ma1 * kLanes), ai = g * MLS_LOAD(row1i + ma1 * kLanes);
          const Lanes br = MLS_LOAD(row2r + ma2 * kLanes), bi = MLS_LOAD(row2i + ma2 * kLanes);
          sr += ar * br - ai * bi;
          si += ar * bi + ai * br;
        }
        const double gb = cg[mb1 * (j2 + 1) + mb2];
        acc_r += gb * sr;
        acc_i += gb * si;
      }
      const int out = (mb * (j + 1) + ma) * kLanes;
      MLS_STORE(zr + out, acc_r);
      MLS_STORE(zi + out, acc_i);
    }
  }
}

// Weight of entry (mb, ma) of layer j in the half-plane sums below: columns mb < j/2
// count once, and for even j the middle column up to its centre, the centre by half.
// Twice such a sum is the full-plane sum for arrays with the symmetry of U.
inline double half_plane_weight(int j, int mb, int ma) {
  if (2 * mb < j) return 1.0;
  if (2 * mb > j || 2 * ma > j) return 0.0;
  return 2 * ma == j ? 0.5 : 1.0;
}

// sum over the half plane of layer j of Re(conj(a) b), kLanes sums at once: a is
// [mb][ma][lane]; b is the same (kLanes centres) or, broadcast, [mb][ma] (one Y against
// the 4-wide (u, du/dd) of a neighbour)
template <bool broadcast_b>
MLS_MULTIVERSION void half_plane_dot_lanes(int j, const double* a_re, const double* a_im,
                                           const double* b_re, const double* b_im,
                                           double out[kLanes]) {
  auto b = [](const double* p, int i) -> Lanes {
    if constexpr (broadcast_b) return Lanes{} + p[i];
    return MLS_LOAD(p + kLanes * i);
  };
  auto term = [&](int i) {
    return MLS_LOAD(a_re + kLanes * i) * b(b_re, i) + MLS_LOAD(a_im + kLanes * i) * b(b_im, i);
  };
  Lanes sum = {};
  const int full = ((j + 1) / 2) * (j + 1);  // columns mb < j/2
  for (int i = 0; i < full; ++i) sum += term(i);
  if (j % 2 == 0)
    for (int ma = 0; 2 * ma <= j; ++ma) sum += half_plane_weight(j, j / 2, ma) * term(full + ma);
  MLS_STORE(out, sum);
}

// y[i][lane] += coef[lane] * x[i][lane] for n = entries * kLanes values (lanes are
// centres, or the neighbours of add_neighbors)
MLS_MULTIVERSION
void axpy_lanes(int n, const double* coef, const double* x, double* y) {
  const Lanes c = MLS_LOAD(coef);
  for (int i = 0; i < n; i += kLanes) MLS_STORE(y + i, MLS_LOAD(y + i) + c * MLS_LOAD(x + i));
}

static_assert(kLanes == 4, "the gradient recursion keeps (u, du/dx, du/dy, du/dz) in one Lanes");

// Hyperspherical harmonics u^j_{ma,mb} by the recursion of VMK 4.8.2 in the Cayley-Klein
// parameters a, b, on 4-wide values, arrays [u index][4]. Layer j, column mb <= j/2, from
// layer j-1, column mb:
//   u^j_{ma,mb} = sqrt((j-ma)/(j-mb)) conj(a) u^{j-1}_{ma,mb}
//               - sqrt(ma/(j-mb)) conj(b) u^{j-1}_{ma-1,mb}
// columns mb > j/2 from u^j_{j-ma,j-mb} = (-1)^(ma-mb) conj(u^j_{ma,mb}) (VMK 4.4 eq. 2).
// Without gradient the lanes are four neighbours (a, b per lane). With gradient they are
// (u, du/dx, du/dy, du/dz) of one neighbour: a, b equal in all lanes and da, db holding
// (0, d/dx, d/dy, d/dz), the product rule (a P)' = a P' + a' p folded in.
template <bool with_gradient>
MLS_MULTIVERSION void u_recursion(int twojmax, const int* u_offset, const int* rec_offset,
                                  const double* rec_a, const double* rec_b, const double* a_re,
                                  const double* a_im, const double* b_re, const double* b_im,
                                  const double* da_re, const double* da_im, const double* db_re,
                                  const double* db_im, double* ur, double* ui) {
  const Lanes ar = MLS_LOAD(a_re), ai = MLS_LOAD(a_im), br = MLS_LOAD(b_re), bi = MLS_LOAD(b_im);
  Lanes dar = {}, dai = {}, dbr = {}, dbi = {};
  if constexpr (with_gradient) {
    dar = MLS_LOAD(da_re);
    dai = MLS_LOAD(da_im);
    dbr = MLS_LOAD(db_re);
    dbi = MLS_LOAD(db_im);
  }
  const Lanes zero = {};
  const Lanes first = with_gradient ? Lanes{1.0, 0.0, 0.0, 0.0} : zero + 1.0;
  MLS_STORE(ur, first);
  MLS_STORE(ui, zero);
  for (int j = 1; j <= twojmax; ++j) {
    for (int mb = 0; 2 * mb <= j; ++mb) {
      const int in = (u_offset[j - 1] + mb * j) * 4, out = (u_offset[j] + mb * (j + 1)) * 4;
      const double* ca = rec_a + rec_offset[j] + mb * j;
      const double* cb = rec_b + rec_offset[j] + mb * j;
      // conj(x) u^{j-1}_{ma,mb}, plus conj(x') times its value lane with gradient
      struct Product {
        Lanes re, im;
      };
      auto conj_times = [&](Lanes xr, Lanes xi, Lanes dxr, Lanes dxi, int ma) {
        const Lanes pr = MLS_LOAD(ur + in + 4 * ma), pi = MLS_LOAD(ui + in + 4 * ma);
        Product p{xr * pr + xi * pi, xr * pi - xi * pr};
        if constexpr (with_gradient) {
          const double vr = ur[in + 4 * ma], vi = ui[in + 4 * ma];
          p.re += dxr * vr + dxi * vi;
          p.im += dxr * vi - dxi * vr;
        }
        return p;
      };
      MLS_STORE(ur + out + 4 * j, zero);
      MLS_STORE(ui + out + 4 * j, zero);
      for (int ma = 0; ma < j; ++ma) {
        const Product p = conj_times(ar, ai, dar, dai, ma);
        MLS_STORE(ur + out + 4 * ma, ca[ma] * p.re);
        MLS_STORE(ui + out + 4 * ma, ca[ma] * p.im);
      }
      for (int ma = 0; ma < j; ++ma) {
        const Product p = conj_times(br, bi, dbr, dbi, ma);
        double* outr = ur + out + 4 * (ma + 1);
        double* outi = ui + out + 4 * (ma + 1);
        MLS_STORE(outr, MLS_LOAD(outr) - cb[ma] * p.re);
        MLS_STORE(outi, MLS_LOAD(outi) - cb[ma] * p.im);
      }
    }
    for (int mb = j / 2 + 1; mb <= j; ++mb) {
      const int out = (u_offset[j] + mb * (j + 1)) * 4, in = (u_offset[j] + (j - mb) * (j + 1)) * 4;
      double sign = (mb % 2 == 0) ? 1.0 : -1.0;
      for (int ma = 0; ma <= j; ++ma, sign = -sign) {
        MLS_STORE(ur + out + 4 * ma, sign * MLS_LOAD(ur + in + 4 * (j - ma)));
        MLS_STORE(ui + out + 4 * ma, -sign * MLS_LOAD(ui + in + 4 * (j - ma)));
      }
    }
  }
}

}  // namespace

int BispectrumSettings::num_elements() const {
  if (chem_map.empty()) return 1;
  return *std::max_element(chem_map.begin(), chem_map.end()) + 1;
}

double BispectrumSettings::max_cutoff() const {
  double c = 0.0;
  for (int t = 0; t < num_types(); ++t) c = std::max(c, cutoff(t));
  return c;
}

void BispectrumSettings::validate() const {
  auto num = [](double v) {
    std::ostringstream o;
    o << v;
    return o.str();
  };
  if (!(rcutfac > 0.0) || !std::isfinite(rcutfac))
    bad_setting("rcutfac must be a positive number, got " + num(rcutfac));
  if (!(rfac0 > 0.0 && rfac0 <= 1.0)) bad_setting("rfac0 must lie in (0, 1], got " + num(rfac0));
  if (twojmax < 0) bad_setting("twojmax must be >= 0, got " + std::to_string(twojmax));
  if (twojmax > kMaxTwojmax)
    bad_setting("twojmax must be <= " + std::to_string(kMaxTwojmax) + ", got " +
                std::to_string(twojmax));
  if (radius.empty()) bad_setting("at least one element radius is needed");
  if (weight.size() != radius.size())
    bad_setting("radius and weight need one value per element: got " +
                std::to_string(radius.size()) + " radii and " + std::to_string(weight.size()) +
                " weights");
  if (!(rmin0 >= 0.0)) bad_setting("rmin0 must be >= 0, got " + num(rmin0));
  for (int t = 0; t < num_types(); ++t) {
    if (!(radius[t] > 0.0) || !std::isfinite(radius[t]))
      bad_setting("radius of element " + std::to_string(t + 1) + " must be positive, got " +
                  num(radius[t]));
    if (!std::isfinite(weight[t]))
      bad_setting("weight of element " + std::to_string(t + 1) + " must be finite, got " +
                  num(weight[t]));
    if (!(cutoff(t) > rmin0))
      bad_setting("cutoff 2*radius*rcutfac of element " + std::to_string(t + 1) +
                  " must exceed rmin0 " + num(rmin0));
  }
  if (!chem_map.empty()) {
    if (chem_map.size() != radius.size())
      bad_setting("chem needs one channel per element: got " + std::to_string(chem_map.size()) +
                  " for " + std::to_string(radius.size()) + " elements");
    for (int c : chem_map)
      if (c < 0 || c >= num_types()) bad_setting("chem channel out of range: " + std::to_string(c));
  }
}

Bispectrum::Bispectrum(const BispectrumSettings& settings) : s_(settings) {
  s_.validate();
  const int J = s_.twojmax;
  nelem_ = s_.num_elements();
  center_elem_ = element_of(0);  // compute sna/grid: every grid point is a centre of type 1

  u_offset_.resize(J + 2);
  for (int j = 0; j <= J; ++j) u_offset_[j + 1] = u_offset_[j] + (j + 1) * (j + 1);
  num_u_ = u_offset_[J + 1];

  // coefficients of the U recursion (see u_recursion), per layer j and column mb <= j/2
  rec_offset_.assign(J + 2, 0);
  for (int j = 1; j <= J; ++j) {
    rec_offset_[j] = static_cast<int>(rec_a_.size());
    for (int mb = 0; 2 * mb <= j; ++mb)
      for (int ma = 0; ma < j; ++ma) {
        rec_a_.push_back(std::sqrt(static_cast<double>(j - ma) / (j - mb)));
        rec_b_.push_back(std::sqrt(static_cast<double>(ma + 1) / (j - mb)));
      }
  }

  std::vector<double> fact(3 * J / 2 + 3, 1.0);
  for (std::size_t n = 1; n < fact.size(); ++n) fact[n] = fact[n - 1] * static_cast<double>(n);

  // Z blocks and their Clebsch-Gordan tables <j1 m1 j2 m2 | j m> with m = m1 + m2 - c,
  // c = (j1 + j2 - j) / 2, from the Racah formula (VMK 8.2.1 eq. 3), in doubled labels.
  block_lookup_.assign((J + 1) * (J + 1) * (J + 1), -1);
  for (int j1 = 0; j1 <= J; ++j1)
    for (int j2 = 0; j2 <= j1; ++j2)
      for (int j = j1 - j2; j <= std::min(J, j1 + j2); j += 2) {
        block_lookup_[(j1 * (J + 1) + j2) * (J + 1) + j] = static_cast<int>(blocks_.size());
        blocks_.push_back({j1, j2, j, cg_.size()});
        const double tri = std::sqrt(fact[(j1 + j2 - j) / 2] * fact[(j1 - j2 + j) / 2] *
                                     fact[(-j1 + j2 + j) / 2] / fact[(j1 + j2 + j) / 2 + 1]);
        for (int m1 = 0; m1 <= j1; ++m1)
          for (int m2 = 0; m2 <= j2; ++m2) {
            const int m = m1 + m2 - (j1 + j2 - j) / 2;
            if (m < 0 || m > j) {
              cg_.push_back(0.0);
              continue;
            }
            const int a2 = 2 * m1 - j1;  // 2 M1
            const int b2 = 2 * m2 - j2;  // 2 M2
            const int kmin = std::max({0, -(j - j2 + a2) / 2, -(j - j1 - b2) / 2});
            const int kmax = std::min({(j1 + j2 - j) / 2, (j1 - a2) / 2, (j2 + b2) / 2});
            double sum = 0.0;
            for (int k = kmin; k <= kmax; ++k) {
              const double den = fact[k] * fact[(j1 + j2 - j) / 2 - k] * fact[(j1 - a2) / 2 - k] *
                                 fact[(j2 + b2) / 2 - k] * fact[(j - j2 + a2) / 2 + k] *
                                 fact[(j - j1 - b2) / 2 + k];
              sum += (k % 2 ? -1.0 : 1.0) / den;
            }
            const int c2 = 2 * m - j;
            const double norm = std::sqrt(fact[m1] * fact[j1 - m1] * fact[m2] * fact[j2 - m2] *
                                          fact[(j + c2) / 2] * fact[(j - c2) / 2] * (j + 1));
            cg_.push_back(sum * tri * norm);
          }
      }

  for (int j1 = 0; j1 <= J; ++j1)
    for (int j2 = 0; j2 <= j1; ++j2)
      for (int j = j1 - j2; j <= std::min(J, j1 + j2); j += 2)
        if (j >= j1) triples_.push_back({j1, j2, j, block_id(j1, j2, j)});

  const int ntrip = static_cast<int>(triples_.size());
  num_linear_ = ntrip * nelem_ * nelem_ * nelem_;
  num_descriptors_ = num_linear_;
  if (s_.quadraticflag) num_descriptors_ += num_linear_ * (num_linear_ + 1) / 2;

  bzero_.assign(J + 1, 0.0);
  if (s_.bzeroflag)
    for (int j = 0; j <= J; ++j) bzero_[j] = s_.bnormflag ? 1.0 : j + 1.0;

  // Adjoint plan. B(j1,j2,j; E1,E2,E3) is trilinear in U^j1_E1, U^j2_E2 and conj U^j_E3;
  // each slot's derivative is a Z block contracted with dU of that slot (Thompson 2015,
  // eqs. 19-21; the (j+1)/(j1+1) factors come from the CG symmetry relations). Every slot
  // is kept separately, so beta need not be symmetric under element permutations.
  const int n = nelem_;
  std::vector<std::vector<AdjointTerm>> plan(blocks_.size() * n * n * n);
  auto add = [&](int blk, int e1, int e2, int e3, int comp, double factor) {
    plan[((static_cast<std::size_t>(blk) * n + e1) * n + e2) * n + e3].push_back({comp, factor});
  };
  for (int t = 0; t < ntrip; ++t) {
    const Triple& tr = triples_[t];
    const double f1 = s_.bnormflag ? 1.0 : (tr.j + 1.0) / (tr.j1 + 1.0);
    const double f2 = s_.bnormflag ? 1.0 : (tr.j + 1.0) / (tr.j2 + 1.0);
    for (int E1 = 0; E1 < n; ++E1)
      for (int E2 = 0; E2 < n; ++E2)
        for (int E3 = 0; E3 < n; ++E3) {
          const int comp = ((E1 * n + E2) * n + E3) * ntrip + t;
          add(tr.block, E1, E2, E3, comp, 1.0);
          add(block_id(tr.j, tr.j2, tr.j1), E3, E2, E1, comp, f1);
          add(block_id(tr.j, tr.j1, tr.j2), E3, E1, E2, comp, f2);
        }
  }
  adj_start_.assign(plan.size() + 1, 0);
  for (std::size_t i = 0; i < plan.size(); ++i) {
    adj_start_[i + 1] = adj_start_[i] + plan[i].size();
    adj_terms_.insert(adj_terms_.end(), plan[i].begin(), plan[i].end());
  }
}

int Bispectrum::block_id(int j1, int j2, int j) const {
  const int J = s_.twojmax;
  return block_lookup_[(j1 * (J + 1) + j2) * (J + 1) + j];
}

BispectrumWorkspace Bispectrum::make_workspace() const {
  BispectrumWorkspace ws;
  const std::size_t nu = static_cast<std::size_t>(num_u_) * nelem_;
  const int J = s_.twojmax;
  const std::size_t nz = static_cast<std::size_t>(J / 2 + 1) * (J + 1);
  ws.utot_re.assign(nu * kLanes, 0.0);
  ws.utot_im.assign(nu * kLanes, 0.0);
  ws.y_re.assign(nu * kLanes, 0.0);
  ws.y_im.assign(nu * kLanes, 0.0);
  ws.z_re.assign(nz * kLanes, 0.0);
  ws.z_im.assign(nz * kLanes, 0.0);
  ws.ylane_re.assign(nu, 0.0);
  ws.ylane_im.assign(nu, 0.0);
  ws.u4_re.assign(4 * static_cast<std::size_t>(num_u_), 0.0);
  ws.u4_im.assign(4 * static_cast<std::size_t>(num_u_), 0.0);
  ws.acc_re.assign(4 * nu, 0.0);
  ws.acc_im.assign(4 * nu, 0.0);
  ws.linear.assign(static_cast<std::size_t>(num_linear_) * kLanes, 0.0);
  ws.beta_linear.assign(static_cast<std::size_t>(num_linear_) * kLanes, 0.0);
  ws.coef.assign(static_cast<std::size_t>(nelem_) * kLanes, 0.0);
  return ws;
}

void Bispectrum::begin_centers(BispectrumWorkspace& ws) const {
  std::fill(ws.utot_re.begin(), ws.utot_re.end(), 0.0);
  std::fill(ws.utot_im.begin(), ws.utot_im.end(), 0.0);
  // self contribution w_self = 1 on the diagonal of the centre's channel (or of all)
  for (int e = 0; e < nelem_; ++e) {
    if (e != center_elem_ && !s_.wselfallflag) continue;
    for (int j = 0; j <= s_.twojmax; ++j)
      for (int m = 0; m <= j; ++m) {
        const std::size_t i = static_cast<std::size_t>(e) * num_u_ + u_index(j, m, m);
        for (int l = 0; l < kLanes; ++l) ws.utot_re[i * kLanes + l] = 1.0;
      }
  }
}

// Cayley-Klein parameters a = (z0 - i z)/r0, b = (y - i x)/r0 of the point (theta0,
// theta, phi) of the 3-sphere that d maps to (Thompson 2015, eqs. 3-4), and optionally
// their derivatives with respect to d.
Bispectrum::CayleyKlein Bispectrum::cayley_klein(const double d[3], double rcut,
                                                 bool with_derivative) const {
  const double x = d[0], y = d[1], z = d[2];
  const double r = std::sqrt(x * x + y * y + z * z);
  const double rscale = s_.rfac0 * kPi / (rcut - s_.rmin0);
  const double theta0 = (r - s_.rmin0) * rscale;
  const double z0 = r * std::cos(theta0) / std::sin(theta0);
  const double r0inv = 1.0 / std::sqrt(r * r + z0 * z0);
  CayleyKlein ck{z0 * r0inv, -z * r0inv, y * r0inv, -x * r0inv, {}, {}, {}, {}};
  if (!with_derivative) return ck;
  const double dz0dr = z0 / r - r * rscale * (r * r + z0 * z0) / (r * r);
  const double dr0invdr = -r0inv * r0inv * r0inv * (r + z0 * dz0dr);
  for (int k = 0; k < 3; ++k) {
    const double unit = d[k] / r;
    const double dr0inv = dr0invdr * unit;
    ck.dar[k] = dz0dr * unit * r0inv + z0 * dr0inv;
    ck.dai[k] = -z * dr0inv;
    ck.dbr[k] = y * dr0inv;
    ck.dbi[k] = -x * dr0inv;
  }
  ck.dai[2] -= r0inv;
  ck.dbr[1] += r0inv;
  ck.dbi[0] -= r0inv;
  return ck;
}

// u and du/dd of one neighbour, [u index][4] (see u_recursion)
void Bispectrum::wigner_u_gradient(const double d[3], double rcut,
                                   BispectrumWorkspace& ws) const {
  const CayleyKlein ck = cayley_klein(d, rcut, true);
  const double a_re[4] = {ck.ar, ck.ar, ck.ar, ck.ar}, a_im[4] = {ck.ai, ck.ai, ck.ai, ck.ai};
  const double b_re[4] = {ck.br, ck.br, ck.br, ck.br}, b_im[4] = {ck.bi, ck.bi, ck.bi, ck.bi};
  const double da_re[4] = {0.0, ck.dar[0], ck.dar[1], ck.dar[2]};
  const double da_im[4] = {0.0, ck.dai[0], ck.dai[1], ck.dai[2]};
  const double db_re[4] = {0.0, ck.dbr[0], ck.dbr[1], ck.dbr[2]};
  const double db_im[4] = {0.0, ck.dbi[0], ck.dbi[1], ck.dbi[2]};
  u_recursion<true>(s_.twojmax, u_offset_.data(), rec_offset_.data(), rec_a_.data(),
                    rec_b_.data(), a_re, a_im, b_re, b_im, da_re, da_im, db_re, db_im,
                    ws.u4_re.data(), ws.u4_im.data());
}

void Bispectrum::add_neighbors(BispectrumWorkspace& ws, int lane, std::size_t count,
                               const double* d, const int* types) const {
  // four neighbours at a time through the recursion, weighted into per-element 4-wide
  // sums; the lanes of those go into the centre's U at the end
  std::fill(ws.acc_re.begin(), ws.acc_re.end(), 0.0);
  std::fill(ws.acc_im.begin(), ws.acc_im.end(), 0.0);
  for (std::size_t first = 0; first < count; first += 4) {
    double a_re[4] = {1, 1, 1, 1}, a_im[4] = {}, b_re[4] = {}, b_im[4] = {};
    double scale[4] = {};  // f(r) w of each lane; 0 pads a short group
    int element[4] = {};
    for (std::size_t k = 0; k < 4 && first + k < count; ++k) {
      const double* dk = d + 3 * (first + k);
      const int type = types[first + k];
      const double rcut = s_.cutoff(type);
      const CayleyKlein ck = cayley_klein(dk, rcut, false);
      a_re[k] = ck.ar;
      a_im[k] = ck.ai;
      b_re[k] = ck.br;
      b_im[k] = ck.bi;
      double f, df;
      switching(s_, std::sqrt(dk[0] * dk[0] + dk[1] * dk[1] + dk[2] * dk[2]), rcut, f, df);
      scale[k] = f * s_.weight[type];
      element[k] = element_of(type);
    }
    u_recursion<false>(s_.twojmax, u_offset_.data(), rec_offset_.data(), rec_a_.data(),
                       rec_b_.data(), a_re, a_im, b_re, b_im, nullptr, nullptr, nullptr,
                       nullptr, ws.u4_re.data(), ws.u4_im.data());
    for (int e = 0; e < nelem_; ++e) {
      double masked[4];
      bool any = false;
      for (int k = 0; k < 4; ++k) {
        masked[k] = element[k] == e ? scale[k] : 0.0;
        any = any || masked[k] != 0.0;
      }
      if (!any) continue;
      const std::size_t off = static_cast<std::size_t>(e) * num_u_ * 4;
      axpy_lanes(4 * num_u_, masked, ws.u4_re.data(), ws.acc_re.data() + off);
      axpy_lanes(4 * num_u_, masked, ws.u4_im.data(), ws.acc_im.data() + off);
    }
  }
  for (int e = 0; e < nelem_; ++e)
    for (int i = 0; i < num_u_; ++i) {
      const std::size_t src = (static_cast<std::size_t>(e) * num_u_ + i) * 4;
      const std::size_t dst = (static_cast<std::size_t>(e) * num_u_ + i) * kLanes + lane;
      const double* ar = &ws.acc_re[src];
      const double* ai = &ws.acc_im[src];
      ws.utot_re[dst] += (ar[0] + ar[1]) + (ar[2] + ar[3]);
      ws.utot_im[dst] += (ai[0] + ai[1]) + (ai[2] + ai[3]);
    }
}

void Bispectrum::z_block(const Block& blk, int e1, int e2, BispectrumWorkspace& ws) const {
  const std::size_t o1 = (static_cast<std::size_t>(e1) * num_u_ + u_offset_[blk.j1]) * kLanes;
  const std::size_t o2 = (static_cast<std::size_t>(e2) * num_u_ + u_offset_[blk.j2]) * kLanes;
  z_lanes(blk.j1, blk.j2, blk.j, cg_.data() + blk.cg, ws.utot_re.data() + o1,
          ws.utot_im.data() + o1, ws.utot_re.data() + o2, ws.utot_im.data() + o2,
          ws.z_re.data(), ws.z_im.data());
  if (s_.bnormflag) {
    const double inv = 1.0 / (blk.j + 1);
    const int n = (blk.j / 2 + 1) * (blk.j + 1) * kLanes;
    for (int i = 0; i < n; ++i) {
      ws.z_re[i] *= inv;
      ws.z_im[i] *= inv;
    }
  }
}

void Bispectrum::linear_components(BispectrumWorkspace& ws) const {
  const int n = nelem_;
  const int ntrip = static_cast<int>(triples_.size());
  for (int t = 0; t < ntrip; ++t) {
    const Triple& tr = triples_[t];
    for (int e1 = 0; e1 < n; ++e1)
      for (int e2 = 0; e2 < n; ++e2) {
        z_block(blocks_[tr.block], e1, e2, ws);
        for (int e3 = 0; e3 < n; ++e3) {
          const std::size_t off = (static_cast<std::size_t>(e3) * num_u_ + u_offset_[tr.j]) * kLanes;
          double b[kLanes];
          half_plane_dot_lanes<false>(tr.j, ws.utot_re.data() + off, ws.utot_im.data() + off,
                               ws.z_re.data(), ws.z_im.data(), b);
          const bool self = (e1 == center_elem_ && e2 == center_elem_ && e3 == center_elem_);
          const double shift = (s_.bzeroflag && (self || s_.wselfallflag)) ? bzero_[tr.j] : 0.0;
          const std::size_t k = static_cast<std::size_t>((e1 * n + e2) * n + e3) * ntrip + t;
          for (int l = 0; l < kLanes; ++l) ws.linear[l * num_linear_ + k] = 2.0 * b[l] - shift;
        }
      }
  }
}

void Bispectrum::components(BispectrumWorkspace& ws, double* const out[kLanes]) const {
  linear_components(ws);
  const int nl = num_linear_;
  for (int l = 0; l < kLanes; ++l) {
    if (out[l] == nullptr) continue;
    const double* b = ws.linear.data() + static_cast<std::size_t>(l) * nl;
    std::copy(b, b + nl, out[l]);
    if (!s_.quadraticflag) continue;
    // quadratic terms as in compute sna/grid: 0.5 B_i^2, then B_i B_k for k > i
    double* q = out[l] + nl;
    for (int i = 0; i < nl; ++i) {
      *q++ = 0.5 * b[i] * b[i];
      for (int k = i + 1; k < nl; ++k) *q++ = b[i] * b[k];
    }
  }
}

void Bispectrum::begin_adjoint(BispectrumWorkspace& ws, const double* const beta[kLanes]) const {
  const int nl = num_linear_;
  if (s_.quadraticflag) linear_components(ws);
  for (int l = 0; l < kLanes; ++l) {
    double* bl = ws.beta_linear.data() + static_cast<std::size_t>(l) * nl;
    if (beta[l] == nullptr) {
      std::fill(bl, bl + nl, 0.0);
      continue;
    }
    std::copy(beta[l], beta[l] + nl, bl);
    if (!s_.quadraticflag) continue;
    // chain rule through the quadratic terms
    const double* b = ws.linear.data() + static_cast<std::size_t>(l) * nl;
    const double* q = beta[l] + nl;
    for (int i = 0; i < nl; ++i) {
      bl[i] += *q++ * b[i];
      for (int k = i + 1; k < nl; ++k) {
        bl[i] += *q * b[k];
        bl[k] += *q * b[i];
        ++q;
      }
    }
  }
  std::fill(ws.y_re.begin(), ws.y_re.end(), 0.0);
  std::fill(ws.y_im.begin(), ws.y_im.end(), 0.0);
  const int n = nelem_;
  for (std::size_t b = 0; b < blocks_.size(); ++b) {
    const Block& blk = blocks_[b];
    const int size = (blk.j / 2 + 1) * (blk.j + 1) * kLanes;
    for (int e1 = 0; e1 < n; ++e1)
      for (int e2 = 0; e2 < n; ++e2) {
        bool any = false;
        for (int e3 = 0; e3 < n; ++e3) {
          const std::size_t p = ((b * n + e1) * n + e2) * n + e3;
          for (int l = 0; l < kLanes; ++l) {
            const double* bl = ws.beta_linear.data() + static_cast<std::size_t>(l) * nl;
            double sum = 0.0;
            for (std::size_t i = adj_start_[p]; i < adj_start_[p + 1]; ++i)
              sum += adj_terms_[i].factor * bl[adj_terms_[i].component];
            ws.coef[e3 * kLanes + l] = sum;
            any = any || sum != 0.0;
          }
        }
        if (!any) continue;
        z_block(blk, e1, e2, ws);
        for (int e3 = 0; e3 < n; ++e3) {
          const std::size_t off = (static_cast<std::size_t>(e3) * num_u_ + u_offset_[blk.j]) * kLanes;
          axpy_lanes(size, &ws.coef[e3 * kLanes], ws.z_re.data(), ws.y_re.data() + off);
          axpy_lanes(size, &ws.coef[e3 * kLanes], ws.z_im.data(), ws.y_im.data() + off);
        }
      }
  }
}

void Bispectrum::select_lane(BispectrumWorkspace& ws, int lane) const {
  const std::size_t n = ws.ylane_re.size();
  for (std::size_t i = 0; i < n; ++i) {
    ws.ylane_re[i] = ws.y_re[i * kLanes + lane];
    ws.ylane_im[i] = ws.y_im[i * kLanes + lane];
  }
}

void Bispectrum::neighbor_gradient(BispectrumWorkspace& ws, const double d[3], int type,
                                   double grad[3]) const {
  const double rcut = s_.cutoff(type);
  wigner_u_gradient(d, rcut, ws);
  const double r = std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
  double f, df;
  switching(s_, r, rcut, f, df);
  const std::size_t base = static_cast<std::size_t>(element_of(type)) * num_u_;
  const double* yr = ws.ylane_re.data() + base;
  const double* yi = ws.ylane_im.data() + base;
  double g[4] = {0, 0, 0, 0};  // sum Re(conj(u) y), then of du/dx, du/dy, du/dz
  for (int j = 0; j <= s_.twojmax; ++j) {
    const int off = u_offset_[j];
    double part[4];
    half_plane_dot_lanes<true>(j, ws.u4_re.data() + 4 * off, ws.u4_im.data() + 4 * off,
                               yr + off, yi + off, part);
    for (int k = 0; k < 4; ++k) g[k] += part[k];
  }
  // U gets w * f(r) * u(d): product rule, then the factor 2 of the half-plane sums
  const double w = s_.weight[type];
  for (int k = 0; k < 3; ++k) grad[k] = 2.0 * w * (df * d[k] / r * g[0] + f * g[1 + k]);
}

}  // namespace mlsurrogate
