"""Building an index: images encoded in batches and their packed codes written into the index
file as they come (memory bounded by a batch, whatever the number of images); under torchrun
each process encodes a contiguous share and writes its own rows of the same file, so the index
is the one a single process would write (the folder must be on a filesystem all ranks see)."""
import os

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils import distributed as dist
from utils.errors import UserError
from utils.retrieval.index_file import CODE_KEYS, IndexWriter, indexed_among, read_index_header
from utils.retrieval.network import ImageFiles, transform_of
from utils.training.checkpoint import write_failure


def share(n):
    """The rows [start, stop) this process encodes."""
    rank, world = dist.rank(), dist.world_size()
    return n * rank // world, n * (rank + 1) // world


@torch.no_grad()
def encode_into(rows, loaded, paths, device, batch_size, num_workers, desc):
    """Encode `paths` and write each batch's packed codes into `rows` (a writable memory map)."""
    ds = ImageFiles(paths, None, transform_of(loaded.config), loaded.config.get("in_channels", 3))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    model = loaded.model.eval()
    done = 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not dist.is_main()):
        f, _, _ = model(batch["img"].to(device, non_blocking=True))
        packed = np.packbits((f > 0).cpu().numpy(), axis=1)  # section 2's rule: a bit is 1 where f > 0
        rows[done:done + len(packed)] = packed
        done += len(packed)
    if isinstance(rows, np.memmap):
        rows.flush()


def index_header(loaded, checkpoint, classes):
    return {"bits": loaded.config["dim"], "config": loaded.config, "checkpoint": os.path.abspath(checkpoint),
            "weights_sha256": loaded.fingerprint, "classes": classes}


def check_append(out, header, loaded):
    """The header of the index at `out` when the images may be added to it, else a one-line refusal."""
    if not os.path.isdir(out):
        raise UserError(f"--append: {out} is not an index folder of this version (an index file of an older "
                        f"version cannot grow); rebuild it with --overwrite instead of --append, then append")
    existing = read_index_header(out)
    if existing.get("weights_sha256") != loaded.fingerprint:
        raise UserError(f"--append: index {out} was built with other weights ({existing.get('checkpoint')}) than "
                        f"those of {loaded.path}; append with the checkpoint that built it, or write a new index")
    diffs = [k for k in CODE_KEYS if existing["config"].get(k) != loaded.config.get(k)]
    if diffs:
        raise UserError(f"--append: index {out} has other codes ({', '.join(diffs)}) than {loaded.path}")
    if header["classes"] and existing.get("classes") and header["classes"] != existing["classes"]:
        raise UserError(f"--append: the classes of these images differ from those of index {out}; index them "
                        f"into a new index")
    return {**existing, "classes": existing.get("classes") or header["classes"]}


def check_duplicates(out, header, paths):
    """Refuse images the index at `out` already holds (by absolute path): appending a split twice
    would rank every one of its images twice."""
    again = indexed_among(out, header["count"], paths)
    if again:
        raise UserError(f"--append: {len(again)} of the {len(paths)} images are already in index {out} (the same "
                        f"path), the first {again[0]}; leave them out, or pass --allow-duplicates to add them again")


def write_index(out, loaded, checkpoint, paths, labels, classes, device, batch_size, num_workers, append=False,
                allow_duplicates=False):
    """Encode `paths` into the index folder `out` (a new one, which replaces any index there only
    once whole, or appended to); returns its count. A failed write (a full disk, a folder gone) is
    one line, with the index at `out` as it was and a new one's partial folder removed."""
    if not paths:
        raise UserError("there are no images to index")
    header = index_header(loaded, checkpoint, classes)
    appending = append and os.path.exists(out)
    if appending:
        header = check_append(out, header, loaded)
        if not allow_duplicates:
            check_duplicates(out, header, paths)
    try:
        return encode_and_write(out, header, loaded, paths, labels, device, batch_size, num_workers, appending)
    except OSError as err:
        raise UserError(write_failure(out, err)) from None


def encode_and_write(out, header, loaded, paths, labels, device, batch_size, num_workers, appending):
    writer, finished = None, False
    try:
        if dist.is_main():
            writer = (IndexWriter.extend if appending else IndexWriter.create)(out, header, paths, labels)
        # The other processes open the rows rank 0 laid out: they need its folder and first row.
        layout = torch.tensor([writer.start if writer else 0], dtype=torch.long, device=device)
        first_row = int(dist.broadcast(layout, 0).item())
        if writer is None:
            folder = out if appending else out.rstrip("/") + ".partial"
            writer = IndexWriter(out, folder, header, first_row, first_row + len(paths))
        dist.barrier()
        start, stop = share(len(paths))
        rows = writer.open_rows()[start:stop]
        encode_into(rows, loaded, paths[start:stop], device, batch_size, num_workers, "encode")
        del rows
        dist.barrier()
        if dist.is_main():
            writer.finish()
            finished = True
    except BaseException:
        if dist.is_main() and writer is not None and not finished:  # the index at `out` is left as it was
            writer.abandon()
        raise
    dist.barrier()
    return writer.total
