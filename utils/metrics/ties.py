"""Tie-aware retrieval metrics: the expectation of P@K, AP@R and mAP over uniformly random orders
within every group of database items at the same Hamming distance from the query (McSherry and
Najork, "Computing information retrieval performance measures efficiently in the presence of
tied scores", ECIR 2008), in closed form, from per-query counts only (docs/method.md section 6).

Why: with short codes most of the top R sit at a handful of distances, so the database index
that breaks ties (the "index" order of utils/metrics/__init__.py) decides a large part of
mAP@R; the expectation is the number a ranking with no tie-break preference earns.

Per query and distance g = 0..L let n_g be the items and r_g the relevant items at distance g,
N_g = sum_{h<g} n_h the items and B_g = sum_{h<g} r_h the relevant items ranked before the group.
The groups take ranks N_g + 1 .. N_g + n_g, in random order within each, independently.

* Precision sum of a group prefix. Take the first m positions of group g and say x relevant
  items fall there (so they sit on a uniform random x-subset of those m positions). A position
  i (1..m) is relevant with probability x/m; given that, each of the other x - 1 relevant
  items lies before it with probability (i - 1)/(m - 1), so its expected precision is
  (B_g + 1 + (i - 1)(x - 1)/(m - 1)) / (N_g + i). Summed over i, with
  D = H(N_g + m) - H(N_g) (H the harmonic numbers) and sum_i (i - 1)/(N_g + i) = m - (N_g + 1) D:

      S(g, m, x) = (x/m) [ (B_g + 1) D + (x - 1)/(m - 1) (m - (N_g + 1) D) ]   (second term 0 if m = 1).

  A whole group contributes c_g = S(g, n_g, r_g): McSherry and Najork's expectation.
* P@K: let g hold rank K (N_g < K <= N_g + n_g) and m = K - N_g. The expected relevant count
  among the first K is B_g + m r_g / n_g (linear in the ties), so E[P@K] = (B_g + m r_g/n_g)/K.
* AP@R = (1/R_rel) sum_{k<=R, rel} prec@k with R_rel the relevant among the first R (0 when
  R_rel = 0). Let g hold rank R and m = R - N_g. The groups before g lie wholly inside the cut;
  the number X of relevant items of group g inside it is hypergeometric (n_g items, r_g of them
  relevant, m drawn), so R_rel = B_g + X is random and E[AP@R] is not a ratio of expectations.
  The orders of different groups are independent, and given X = x the relevant items inside
  the cut sit on a uniform x-subset of its m positions, so

      E[AP@R] = sum_x P(X = x) (sum_{h<g} c_h + S(g, m, x)) / (B_g + x)   (terms with B_g + x = 0 are 0).

  mAP over the whole ranking is the case R = database size: the cut takes the last group
  whole, X = r_g, and E[AP] = sum_g c_g / (all relevant).
* P@H<=r and the PR curve count the items within a radius, whatever their order inside it, so
  their tie-aware values equal the ordinary ones.

Every count is an exact integer; the expectations are float64, vectorised over queries (a
query's L + 1 groups and the hypergeometric support, at most min(m, n_g - m) + 1 values).
"""
import contextlib
import functools

import torch

_ROWS_X_SUPPORT = 1 << 22  # query x support entries per block of the AP@R sum (a few tens of MB)


@contextlib.contextmanager
def _one_cpu_thread(device):
    """On the CPU, torch ops on one thread inside: the tensors are small (queries x (L + 1), queries x
    support), and an OpenMP team's barrier per op costs more than the op, many times more on a loaded
    CPU (mAP@100 at NWPU's val size: 0.7 s on two threads against 0.04 s on one, load average 10;
    docs/benchmarks.md section 9)."""
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _serial(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _one_cpu_thread(self.device):
            return method(self, *args, **kwargs)
    return wrapper


def _cut(cum_all, cum_rel, rank):
    """Per query, the group holding `rank` (1-based): (its index, N, B, n, r, m = rank - N), int64."""
    q = torch.full((len(cum_all), 1), rank, dtype=cum_all.dtype, device=cum_all.device)
    g = torch.searchsorted(cum_all, q).clamp(max=cum_all.shape[1] - 1)   # first g with #{d <= g} >= rank
    upto, rel_upto = cum_all.gather(1, g)[:, 0], cum_rel.gather(1, g)[:, 0]
    prev = (g - 1).clamp(min=0)
    before = torch.where(g[:, 0] > 0, cum_all.gather(1, prev)[:, 0], 0)
    rel_before = torch.where(g[:, 0] > 0, cum_rel.gather(1, prev)[:, 0], 0)
    return g[:, 0], before, rel_before, upto - before, rel_upto - rel_before, rank - before


def _prefix_precision(harmonic, before, rel_before, m, x):
    """S above: the expected sum of the precisions at the relevant ranks among the first m positions of a
    group ranked after `before` items (`rel_before` relevant), given x relevant items among them.
    Broadcasts; m >= 1."""
    before, rel_before, m, x = (t.double() if torch.is_tensor(t) else t for t in (before, rel_before, m, x))
    d = harmonic[(before + m).long()] - harmonic[before.long()]
    pairs = torch.where(m > 1, (x - 1) / (m - 1).clamp(min=1) * (m - (before + 1) * d), 0.0)
    return x / m * ((rel_before + 1) * d + pairs)


class ExpectedRanks:
    """Tie-aware per-query metrics from per-query cumulative counts over the distances 0..L:
    cum_all[q, g] = #{items at distance <= g} and cum_rel[q, g] = the relevant ones (what
    utils/metrics/rank_counting.py's RankCounts holds). Float64 tensors of length Q."""

    def __init__(self, cum_all, cum_rel, n_db):
        self.n_db, self.device = int(n_db), cum_all.device
        with _one_cpu_thread(self.device):
            self._count(cum_all, cum_rel)

    def _count(self, cum_all, cum_rel):
        # Queries with no relevant item score 0 everywhere (and a class absent from the database
        # leaves its counts at 0): only the others are computed.
        self.keep = (cum_rel[:, -1] > 0).nonzero()[:, 0]
        self.cum_all = cum_all[self.keep].long().contiguous()
        self.cum_rel = cum_rel[self.keep].long().contiguous()
        self.n_q, dev = len(cum_all), cum_all.device
        # H(0..n_db + 1): one past the database, read (and then discarded) for empty groups at the end.
        self.harmonic = torch.cat([torch.zeros(1, dtype=torch.float64, device=dev),
                                   torch.cumsum(1.0 / torch.arange(1, self.n_db + 2, dtype=torch.float64,
                                                                   device=dev), 0)])
        # log k! for k = 0..n_db, read by index: the hypergeometric weights are gathers, not lgamma calls.
        self.log_factorial = torch.lgamma(torch.arange(self.n_db + 1, dtype=torch.float64, device=dev) + 1)
        self._groups = None

    def _log_choose(self, a, b):
        f = self.log_factorial
        return f[a] - f[b] - f[a - b]

    def _out(self, values):
        out = torch.zeros(self.n_q, dtype=torch.float64, device=self.cum_all.device)
        out[self.keep] = values
        return out

    @_serial
    def precision_at(self, k):
        """E[P@k], k capped at the database size."""
        k = min(int(k), self.n_db)
        _, _, rel_before, n, r, m = _cut(self.cum_all, self.cum_rel, k)
        return self._out((rel_before + m * r.double() / n.clamp(min=1)) / k)

    def group_sums(self):
        """Per query, the sum of c_h over the groups before each group g (Q x (L + 1))."""
        if self._groups is None:
            n = torch.diff(self.cum_all, dim=1, prepend=torch.zeros_like(self.cum_all[:, :1]))
            r = torch.diff(self.cum_rel, dim=1, prepend=torch.zeros_like(self.cum_rel[:, :1]))
            c = torch.where(n > 0, _prefix_precision(self.harmonic, self.cum_all - n, self.cum_rel - r,
                                                     n.clamp(min=1), r), 0.0)
            self._groups = torch.cumsum(c, 1) - c
        return self._groups

    @_serial
    def average_precision(self, R=None):
        """E[AP@R] per query, R capped at the database size; the whole ranking when None."""
        R = self.n_db if R is None else min(int(R), self.n_db)
        g, before, rel_before, n, r, m = _cut(self.cum_all, self.cum_rel, R)
        full = self.group_sums().gather(1, g[:, None])[:, 0]    # the groups wholly inside the cut
        lo, hi = (m - (n - r)).clamp(min=0), torch.minimum(m, r)  # the support of X
        width = int((hi - lo).max()) + 1 if len(g) else 1
        out = torch.empty(len(g), dtype=torch.float64, device=g.device)
        step = max(1, _ROWS_X_SUPPORT // width)
        for a in range(0, len(g), step):
            s = slice(a, a + step)
            x = lo[s, None] + torch.arange(width, device=g.device)
            ok = x <= hi[s, None]
            x = torch.minimum(x, hi[s, None])
            nn, rr, mm = n[s, None], r[s, None], m[s, None]
            logp = self._log_choose(rr, x) + self._log_choose(nn - rr, mm - x) - self._log_choose(nn, mm)
            p = torch.where(ok, torch.exp(logp), 0.0)
            x = x.double()
            p = p / p.sum(1, keepdim=True)   # sums to 1 up to lgamma's rounding
            total = rel_before[s, None] + x
            ap = (full[s, None] + _prefix_precision(self.harmonic, before[s, None], rel_before[s, None],
                                                   m[s, None], x)) / total.clamp(min=1)
            out[s] = (p * torch.where(total > 0, ap, 0.0)).sum(1)
        return self._out(out)
