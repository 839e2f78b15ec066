"""CDNE deep hashing for remote-sensing retrieval.

The method the paper describes lives here at the top, one idea per module:
method.py (the Method interface), cdne.py, losses.py, memory.py, models.py (HashingNet),
hashing.py (LSH, ITQ), metrics/ (Hamming-ranking metrics). The machinery is in packages,
each importing only those listed before it:

    errors.py, distributed.py   one-line errors; the few torch.distributed calls
    metrics/                    Hamming ranking and its metrics
    backbones/                  trunks by name (torchvision, timm), weight files, torchgeo, input spec
    data/                       datasets, the split, image reading and checks, both input pipelines
    evaluation/                 encoding a split, scoring it, test pictures
    training/                   flags -> settings, the trainer, run folder, checkpoints, signals
    retrieval/                  index folders, exact and approximate search, `python -m utils.retrieve`
    table/                      the Table I grid, its report and figures, `python -m utils.table`

flags.py, trainer.py, search.py, retrieve.py and launch.py are doors: the names and commands
README shows, re-exported from the packages that hold them.
"""

import os

# The repository root: default data and runs folders, and the scripts that messages name.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
