"""--pipeline auto: which input pipeline a run takes. pil (splits.py) decodes with Pillow per
image per epoch; cached (cached.py) decodes once into RAM and augments whole batches as
tensors on the device, which pays on GPUs when the decoded splits fit."""
import os


def available_memory():
    """Bytes of RAM available to new allocations (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# The cached pipeline may take this share of the available RAM (the rest: loader workers,
# the framework, other jobs on the node).
CACHE_RAM_SHARE = 0.5


def choose_pipeline(asked, device, n_images, bands=3, img_size=256):
    """(pipeline, reason) of a run asking for `asked` (auto, pil or cached) on `device` (a
    torch.device) with n_images images in its three splits, read as `bands` bands at img_size."""
    if asked != "auto":
        return asked, "as asked"
    if device.type != "cuda":
        return "pil", f"the Pillow pipeline on {device.type}; the cached one pays on GPUs"
    if bands != 3:
        return "pil", "multi-band input reads through Pillow/tifffile"
    need = n_images * 3 * img_size ** 2 * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    have = available_memory()
    if have is None or need > CACHE_RAM_SHARE * have:
        known = f"{have / 2**30:.1f} GiB available" if have else "available RAM unknown"
        return "pil", f"the decoded splits would take {need / 2**30:.1f} GiB, more than half of the RAM ({known})"
    return "cached", (f"the decoded splits take {need / 2**30:.1f} GiB, within half of the "
                      f"{have / 2**30:.1f} GiB of available RAM")
