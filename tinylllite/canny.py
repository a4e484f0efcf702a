"""`python -m tinylllite.canny`: Canny edge hints for a folder of images.

The command's code is `tinylllite/data/canny.py`; this module only gives it its short name.
"""
import sys

from tinylllite.data.canny import main
from tinylllite.errors import run_command

if __name__ == "__main__":
    sys.exit(run_command("canny", main))
