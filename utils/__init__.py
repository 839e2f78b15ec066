"""CDNE deep hashing: data, hashing network, memories, losses, metrics and training machinery."""
