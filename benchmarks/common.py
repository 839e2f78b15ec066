"""What every benchmark prints first: the command line and the machine it ran on."""
import os
import platform
import statistics
import sys

import torch


def cpu_model():
    """lscpu's "Model name" (from /proc/cpuinfo), or platform.processor() elsewhere."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_header():
    print("command: python " + " ".join(sys.argv))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs (load average {load:.1f} at the start), "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, {gpu}")


def spread(values, fmt="{:.2f}"):
    """'median (min-max, n runs)'."""
    return (fmt.format(statistics.median(values)) + " (" + fmt.format(min(values)) + "-"
            + fmt.format(max(values)) + f", {len(values)} runs)")
