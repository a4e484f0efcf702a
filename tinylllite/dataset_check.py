"""`python -m tinylllite.dataset_check`: a training folder or kohya .toml checked before a run.

The command's code is `tinylllite/data/dataset_check.py`; this module only gives it its short name.
"""
import sys

from tinylllite.data.dataset_check import main
from tinylllite.errors import run_command

if __name__ == "__main__":
    sys.exit(run_command("dataset_check", main))
