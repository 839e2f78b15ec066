"""The paper's Table I as a grid of runs: `python -m utils.table`.

    command.py      the command: the grid, stale cells, running or printing them, the report
    cells.py        a cell's folder and command, the flags its script would run with, finished results
    identity.py     whether a folder's run is the one asked for: flags, pipeline, weights, split, environment
    report.py       rows (seeds, the rate chosen on val, cost), table.md/csv/json
    figures.py      the figures (matplotlib): mAP@100 against bits, PR curves, precision at K
    grid_runner.py  cells at once, K per GPU, stop signals passed on;  slurm.py: the Slurm array job
"""
