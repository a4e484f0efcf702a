"""`python -m tinylllite.convert`: a control file between the original, diffusers and kohya layouts.

The command's code is `tinylllite/files/convert.py`; this module only gives it its short name.
"""
import sys

from tinylllite.files.convert import main

if __name__ == "__main__":
    sys.exit(main())
