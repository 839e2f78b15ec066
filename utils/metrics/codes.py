"""The hash code of relaxed codes (docs/method.md section 2) and the ranking rule of section 6
written out (hamming_topk), shared by the metrics, their counting fast path (rank_counting.py),
the test pictures and the search."""
import torch


def binarize(codes):
    """+-1 float32 codes: +1 where the value is > 0, else -1 (docs/method.md section 2)."""
    codes = torch.as_tensor(codes)
    return torch.where(codes > 0, 1.0, -1.0).to(torch.float32)


@torch.no_grad()
def hamming_topk(query_codes, db_codes, k, chunk_size=1024):
    """(distances, indices) of the k nearest database items of each query, ascending
    Hamming distance, ties broken by database index (docs/method.md section 6)."""
    q, db = binarize(query_codes), binarize(db_codes).to(query_codes.device if torch.is_tensor(query_codes) else "cpu")
    L, k = q.shape[1], min(int(k), db.shape[0])
    dists, idxs = [], []
    for start in range(0, q.shape[0], chunk_size):
        d = ((L - q[start:start + chunk_size] @ db.t()) / 2).round().long()
        order = torch.sort(d, dim=1, stable=True).indices[:, :k]
        dists.append(torch.gather(d, 1, order))
        idxs.append(order)
    if not dists:
        return torch.empty(0, k, dtype=torch.long), torch.empty(0, k, dtype=torch.long)
    return torch.cat(dists), torch.cat(idxs)
