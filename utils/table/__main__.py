"""`python -m utils.table`: the Table I grid (utils/table/command.py)."""
import sys

from utils.table.command import main

sys.exit(main())
