"""The retrieval metrics by counting ranks, not sorting: the fast path of utils/metrics/ (it defines them)."""
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from utils.metrics.codes import binarize

# How it is computed, without sorting. Distances are integers 0..L, so the stable ranking is
# a counting sort: the 1-based rank of item j is
#
#     1 + #{k : d_k < d_j} + #{k < j : d_k = d_j}.
#
# The database is cut into blocks of B consecutive items (B = 64 - c, c = bits of the
# database size, so B = 47 for 100k items). For a query, one scatter-add over the database
# fills a table with an int64 entry per (distance, block): the low c bits count the block's
# items at that distance, the high bits flag which of them (a bit mask). The keys
# 1 + d * n_blocks + block come straight out of one float matmul (exact integers). An
# in-place running sum over the table in (distance, block) order then holds, in its low c
# bits, the number of items ranked before each entry (the masks only pollute the high bits,
# which are not read again); the item's place inside its block is the popcount of the mask
# bits below its own. Only relevant items' ranks are read out: AP, P@K and AP@R only look
# at relevant items. A running sum over a bitmap of those ranks then gives every "relevant
# among the first k": at an item's own rank it is its rank among the relevant items, at
# k = #{d <= r} the relevant items within radius r. Everything is exact integer arithmetic
# until the float64 precision ratios.
#
# Queries go in chunks sized by a byte budget (a class's queries share their relevant items),
# and chunk tensors live in reused buffers: fresh multi-megabyte allocations cost page
# faults that would dominate on CPU. On CPU the table and the bitmap are done one query at a
# time so that they stay in cache, and the chunks are spread over torch.get_num_threads()
# Python threads that each run single-threaded torch ops (which release the GIL), rather than
# every op running on an OpenMP team: there are many mid-sized ops, and a team's barrier per
# op is costly, very much so when other processes compete for the cores. On a GPU a chunk's
# queries are done together.

_KEY_BITS = (1 << 23) - 1  # a float32 integer 2^23 + k (k < 2^23) holds k in these bits
_GROUP_ITEMS = 1 << 17     # relevant (query, item) pairs handled together on CPU
_CHUNK_BYTES = 256 << 20   # working memory of the chunks in flight, about (the database's codes come on top)
_M1, _M2, _M4, _H01 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101  # popcount


def _float32_matmul_is_exact():
    """False where float32 matmuls may use TF32/bf16 (or the setting cannot be read)."""
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:  # newer torch, when the per-backend fp32_precision API was used
        return False


class _Buffers:
    """Scratch tensors reused across chunks (a view of the first numel elements)."""

    def __init__(self, device):
        self.device, self.store = device, {}

    def get(self, name, shape, dtype):
        n = math.prod(shape)
        t = self.store.get(name)
        if t is None or t.numel() < n or t.dtype != dtype:
            t = self.store[name] = torch.empty(n, dtype=dtype, device=self.device)
        return t[:n].view(shape)


def _popcount_(x, tmp):
    """In place: number of set bits of each element of a non-negative int64 tensor (SWAR).
    The last multiply may wrap around, which is harmless: only its top byte is kept."""
    torch.bitwise_right_shift(x, 1, out=tmp)
    tmp &= _M1
    x -= tmp
    torch.bitwise_right_shift(x, 2, out=tmp)
    tmp &= _M2
    x &= _M2
    x += tmp
    torch.bitwise_right_shift(x, 4, out=tmp)
    x += tmp
    x &= _M4
    x *= _H01
    x >>= 56
    return x


class _CountingPasses:
    """The passes over one chunk of queries described above; RankCounts sets up what they use."""

    def _chunk(self, qi, rel_idx, buf):
        """Metrics of queries `qi`. rel_idx: database indices of the relevant items, in index
        order, shared by all rows; None for multi-hot labels (then found per row here)."""
        nq, n_db, i64, dev = len(qi), self.n_db, torch.int64, self.device
        kf = torch.matmul(self.aq[qi], self.ad_t, out=buf.get("kf", (nq, n_db), self.ad_t.dtype))
        if self.exact32:
            keys = kf.view(torch.int32)                # masked to the key bits row by row, in cache
        else:
            keys = buf.get("keys", (nq, n_db), i64).copy_(kf)
        if rel_idx is not None:
            n_rel = None
            below = torch.index_select(self.below, 0, rel_idx)
        else:   # multi-hot: per-row index lists, padded to the longest
            rel = (self.yq[qi] @ self.yd_t) > 0
            n_rel = rel.sum(1)
            r, j = rel.nonzero(as_tuple=True)
            pos = torch.arange(len(r), device=dev) - (torch.cumsum(n_rel, 0) - n_rel)[r]
            rel_idx = torch.zeros(nq, max(int(n_rel.max()), 1), dtype=i64, device=dev)
            rel_idx[r, pos] = j
            below = self.below[rel_idx]
        # Rows go in small groups on CPU, so that their relevant-item tensors stay in cache.
        group = max(1, _GROUP_ITEMS // rel_idx.shape[-1]) if dev.type == "cpu" else nq
        per_row = n_rel is not None
        for a in range(0, nq, group):
            rows = slice(a, a + group)
            self._rows(qi[rows], keys[rows], rel_idx[rows] if per_row else rel_idx,
                       n_rel[rows] if per_row else None, below[rows] if per_row else below, buf)

    def _rows(self, qi, keys, rel_idx, n_rel, below, buf):
        """Metrics of the queries `qi`, given their keys and their relevant items."""
        nq, n_db, i64, dev = len(qi), self.n_db, torch.int64, self.device
        shape = (nq, rel_idx.shape[-1])
        tables = self._table_rows if dev.type == "cpu" else self._table_batch

        # 1. Per query, the table (pad count 1, then count | mask bits per entry). Read the
        #    relevant items' entries, then take running sums over the table and read the entry
        #    before theirs: its low c bits count the items ranked before their entry, + 1.
        in_block, rank = buf.get("in_block", shape, i64), buf.get("rank", shape, i64)
        cum_all = buf.get("cum_all", (nq, self.L + 1), i64)
        tables(keys, rel_idx, n_rel, in_block, rank, cum_all, buf)
        low = (1 << self.c) - 1
        rank &= low
        cum_all &= low
        cum_all -= 1                                   # #{d <= v} (the pad counted 1)

        # The item's place inside its entry: the mask bits below its own.
        in_block &= below
        _popcount_(in_block, buf.get("tmp", shape, i64))
        rank += in_block                               # 1-based rank
        if n_rel is not None:
            valid = torch.arange(shape[1], device=dev)[None] < n_rel[:, None]
            rank.masked_fill_(~valid, n_db + 1)        # padding goes to a spare bitmap column

        # 2. Bitmap of the relevant items' ranks; its running sum counts relevant items among
        #    the first k for any k: at an item's own rank it is its rank among the relevant.
        #    Read it at every rank, at n_db (all relevant), at each K and at each #{d <= v}.
        #    Its first entries, kept where an item is relevant, give the precisions at the top.
        kcs = [min(k, n_db) for k in self.topk]
        read = torch.cat([torch.tensor([n_db] + kcs, device=dev).expand(nq, -1), cum_all], 1)
        rel_rank = buf.get("rel_rank", shape, torch.int32)
        counts = torch.empty(read.shape, dtype=torch.int32, device=dev)
        top_hits = torch.empty(nq, max(kcs, default=0) + 1, dtype=torch.int32, device=dev)
        self._bitmap_rows(rank, read, rel_rank, counts, top_hits, buf)

        # 3. Per-query metrics.
        prec = buf.get("prec", shape, torch.float64).copy_(rel_rank)
        prec /= rank                                   # precision at each relevant item
        if n_rel is not None:
            prec.masked_fill_(~valid, 0.0)
        counts = counts.double()
        total = counts[:, 0]
        self.ap[qi] = torch.where(total > 0, prec.sum(1) / total.clamp(min=1), 0.0)
        ranks = torch.arange(top_hits.shape[1], device=dev).clamp(min=1)
        top = (top_hits.double() / ranks).cumsum_(1)  # sum of the precisions at relevant ranks <= k
        for i, (k, kc) in enumerate(zip(self.topk, kcs)):
            hits = counts[:, 1 + i]
            self.ap_at[k][qi] = torch.where(hits > 0, top[:, kc] / hits.clamp(min=1), 0.0)
            self.p_at[k][qi] = hits / kc
        self.cum_all[qi] = cum_all
        self.cum_rel[qi] = counts[:, 1 + len(kcs):].long()   # relevant among the first #{d <= v}

    def _table_rows(self, keys, rel_idx, n_rel, in_block, before, cum_all, buf):
        """CPU: one query at a time, so that its table stays in cache. index_add_ takes the
        int32 keys as they are, and index_select int32 indices."""
        flat = buf.get("table_row", (1 + self.row,), torch.int64)
        table, table_prev = flat[1:], flat[:-1]       # table_prev[k] is table[k - 1]
        last = torch.arange(self.nb, self.row, self.nb, device=self.device)   # last entry per distance
        n = n_rel.tolist() if n_rel is not None else None
        for q in range(len(keys)):
            if self.exact32:
                keys[q].bitwise_and_(_KEY_BITS)
            idx, m = (rel_idx, len(rel_idx)) if n is None else (rel_idx[q, :n[q]], n[q])
            k_rel = torch.index_select(keys[q], 0, idx, out=buf.get("k_rel", (m,), keys.dtype))
            table.zero_()
            table[0] = 1
            table.index_add_(0, keys[q], self.w_db)
            torch.index_select(table, 0, k_rel, out=in_block[q, :m])
            table.cumsum_(0)
            torch.index_select(table_prev, 0, k_rel, out=before[q, :m])
            torch.index_select(table, 0, last, out=cum_all[q])

    def _table_batch(self, keys, rel_idx, n_rel, in_block, before, cum_all, buf):
        """GPU: all rows of the chunk at once."""
        nq, row, nb = len(keys), self.row, self.nb
        flat = buf.get("table", (1 + nq * row,), torch.int64)
        table, table_prev = flat[1:].view(nq, row), flat[:-1].view(nq, row)
        if self.exact32:
            keys.bitwise_and_(_KEY_BITS)
        k_rel = torch.gather(keys, 1, rel_idx.expand(nq, -1)).long()
        table.zero_()
        table[:, 0] = 1
        table.scatter_add_(1, keys.long(), self.w_db.expand(nq, -1))
        torch.gather(table, 1, k_rel, out=in_block)
        table.cumsum_(1)
        torch.gather(table_prev, 1, k_rel, out=before)
        cum_all.copy_(table[:, nb::nb])

    def _bitmap_rows(self, rank, read, rel_rank, counts, top_hits, buf):
        """Running sums of the rank bitmap, read at the ranks and at `read` (one query at a
        time on CPU, so that the bitmap and its running sums stay in cache)."""
        width = self.n_db + 2
        if rank.device.type != "cpu":
            bitmap = torch.zeros(len(rank), width, dtype=torch.bool, device=rank.device)
            bitmap.scatter_(1, rank, True)
            hits = torch.cumsum(bitmap, 1, dtype=torch.int32)
            torch.gather(hits, 1, rank, out=rel_rank)
            torch.gather(hits, 1, read, out=counts)
            w = top_hits.shape[1]
            torch.mul(hits[:, :w], bitmap[:, :w], out=top_hits)
            return
        bitmap = buf.get("bitmap", (width,), torch.bool)
        hits = buf.get("hits", (width,), torch.int32)
        w = top_hits.shape[1]
        for q in range(len(rank)):
            bitmap.zero_()
            bitmap.index_fill_(0, rank[q], True)
            torch.cumsum(bitmap, 0, dtype=torch.int32, out=hits)
            torch.gather(hits, 0, rank[q], out=rel_rank[q])
            torch.gather(hits, 0, read[q], out=counts[q])
            torch.mul(hits[:w], bitmap[:w], out=top_hits[q])


class RankCounts(_CountingPasses):
    """Per-query metric values (float64 tensors of length Q), computed chunk by chunk."""

    def __init__(self, query_codes, query_labels, db_codes, db_labels, topk=(), radius=2, chunk_size=None, max_bytes=None):
        device = torch.as_tensor(query_codes).device
        bq = binarize(query_codes).to(device)
        bd = binarize(db_codes).to(device)
        yq = torch.as_tensor(query_labels).to(device)
        yd = torch.as_tensor(db_labels).to(device)
        if bq.dim() != 2 or bd.dim() != 2 or bq.shape[1] != bd.shape[1]:
            raise ValueError(f"codes must be (n, L) with the same L, got {tuple(bq.shape)} and {tuple(bd.shape)}")
        if (yq.dim() not in (1, 2) or yq.dim() != yd.dim() or len(yq) != len(bq) or len(yd) != len(bd)
                or yq.shape[1:] != yd.shape[1:]):
            raise ValueError("labels must be 1-D class ids or 2-D multi-hot rows (same width), one per code")
        if any(k < 1 for k in topk):
            raise ValueError(f"top-K values must be >= 1, got {topk}")
        n_q, L = bq.shape
        n_db = bd.shape[0]
        if n_db == 0:
            raise ValueError("empty database")
        self.n_q, self.L, self.n_db, self.device = n_q, L, n_db, device
        self.topk, self.radius = topk, radius

        # Table geometry: the low `c` bits of an entry count (running sums reach n_db + 1),
        # the other 64 - c bits are the block mask.
        self.c = (n_db + 1).bit_length()
        self.block = block = 64 - self.c
        self.nb = nb = -(-n_db // block) + (-(-n_db // block)) % 2     # even, so nb / 2 is an integer
        self.row = (L + 1) * nb + 1                                     # entry 0: pad holding a count of 1
        j = torch.arange(n_db, device=device)
        one = torch.ones_like(j)
        self.w_db = 1 + torch.bitwise_left_shift(one, self.c + j % block)   # count 1 + own mask bit
        self.below = torch.bitwise_left_shift(torch.bitwise_left_shift(one, j % block) - 1, self.c)

        # key = 1 + d * nb + block = [-(nb/2) b_q, 1] . [b_j, 2^23 + L nb/2 + 1 + block_j] - 2^23.
        # Every partial sum is an integer in [2^22, 2^24), so a float32 matmul is exact (unless
        # float32 matmuls may drop precision: TF32/bf16), and the 2^23 offset puts the key in
        # the low 23 bits of the float's bit pattern: an in-place mask turns it into int32.
        # Otherwise (huge databases) keys come from a float64 matmul as int64.
        self.exact32 = self.row + nb < 2 ** 23 and _float32_matmul_is_exact()
        kd = torch.float32 if self.exact32 else torch.float64
        offset = 2 ** 23 if self.exact32 else 0
        self.ad_t = torch.cat([bd.to(kd), (offset + L * nb // 2 + 1 + j // block)[:, None].to(kd)], 1).t().contiguous()
        self.aq = torch.cat([bq.to(kd) * (-nb / 2), torch.ones(n_q, 1, dtype=kd, device=device)], 1)

        # Per-query results, in the caller's query order (chunking cannot change them).
        f64 = dict(dtype=torch.float64, device=device)
        self.ap = torch.zeros(n_q, **f64)
        self.ap_at = {k: torch.zeros(n_q, **f64) for k in topk}
        self.p_at = {k: torch.zeros(n_q, **f64) for k in topk}
        self.cum_all = torch.zeros(n_q, L + 1, dtype=torch.int64, device=device)   # #{d <= r}
        self.cum_rel = torch.zeros(n_q, L + 1, dtype=torch.int64, device=device)   # relevant ones

        # Chunks: a class's queries share their relevant items (single-label); multi-hot
        # labels get theirs per chunk. Chunk rows come from the byte budget (on CPU the keys;
        # tables, bitmaps and relevant items go by query or by small groups of queries).
        self.multi = yq.dim() == 2
        workers = torch.get_num_threads() if device.type == "cpu" else 1
        n_rel_max, tasks = n_db, []
        if not self.multi:
            db_order = torch.argsort(yd, stable=True)                      # by class, index order inside
            classes, counts = torch.unique_consecutive(yd[db_order], return_counts=True)
            n_rel_max = int(counts.max())
        per_query = n_db * (self.ad_t.dtype.itemsize + (0 if self.exact32 else 8))   # the keys
        if device.type != "cpu":   # batched: a table, int64 keys, a bitmap and the relevant items per row
            per_query += self.row * 8 + n_db * 13 + n_rel_max * 40
        budget = (max_bytes or _CHUNK_BYTES) / workers
        rows = int(chunk_size) if chunk_size is not None else max(1, int(budget // per_query))
        if self.multi:
            self.yq, self.yd_t = yq.float(), yd.float().t().contiguous()
            tasks = [(torch.arange(a, min(a + rows, n_q), device=device), None) for a in range(0, n_q, rows)]
        else:
            groups = dict(zip(classes.tolist(), zip((torch.cumsum(counts, 0) - counts).tolist(), counts.tolist())))
            q_order = torch.argsort(yq, stable=True)
            q_classes, q_counts = torch.unique_consecutive(yq[q_order], return_counts=True)
            start = 0
            for c, n in zip(q_classes.tolist(), q_counts.tolist()):
                if c in groups:   # a class absent from the database: nothing relevant, all metrics 0
                    a, m = groups[c]
                    tasks += [(q_order[s:min(s + rows, start + n)], db_order[a:a + m])
                              for s in range(start, start + n, rows)]
                start += n
        self._run(tasks, workers)

    def _run(self, tasks, workers):
        if workers <= 1 or len(tasks) <= 1:
            buf = _Buffers(self.device)
            for qi, rel_idx in tasks:
                self._chunk(qi, rel_idx, buf)
            return
        local = threading.local()

        def init():
            torch.set_num_threads(1)   # this thread's ops run serially (restored for all below)
            local.buf = _Buffers(self.device)

        try:
            with ThreadPoolExecutor(workers, initializer=init) as pool:
                list(pool.map(lambda task: self._chunk(*task, local.buf), tasks))
        finally:
            torch.set_num_threads(workers)

    def mean(self, per_query):
        return float(per_query.mean()) if self.n_q else 0.0

    @property
    def p_radius(self):
        """Precision within the radius, per query (0 when nothing is that close)."""
        if self.radius < 0:
            return torch.zeros(self.n_q, dtype=torch.float64, device=self.device)
        r = min(self.radius, self.L)
        within = self.cum_all[:, r].double()
        return torch.where(within > 0, self.cum_rel[:, r] / within.clamp(min=1), 0.0)

    def pr(self):
        """(precision, recall) per radius 0..L, float64."""
        ca, cr = self.cum_all.double(), self.cum_rel.double()
        precision = torch.where(ca > 0, cr / ca.clamp(min=1), 0.0).mean(0) if self.n_q else ca.sum(0)
        total = cr[:, -1:]
        has = total[:, 0] > 0
        recall = (cr[has] / total[has]).mean(0) if bool(has.any()) else torch.zeros_like(precision)
        return precision, recall
