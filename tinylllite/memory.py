"""`python -m tinylllite.memory`: will a training run fit my GPU? Its peak memory, estimated without a GPU.

The command's code is `tinylllite/run/memory.py`; this module only gives it its short name.
"""
import sys

from tinylllite.run.memory import main

if __name__ == "__main__":
    sys.exit(main())
