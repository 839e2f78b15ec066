"""The paper's Table I as a grid of runs: `python -m utils.table`.

    command.py      the command: the grid, stale cells, running or printing them, the report
    cells.py        a cell's folder and command, and whether its run is the one asked for
    report.py       rows (seeds, the rate chosen on val, cost), table.md/csv/json, figures
    grid_runner.py  cells at once, K per GPU, stop signals passed on;  slurm.py: the Slurm array job
"""
