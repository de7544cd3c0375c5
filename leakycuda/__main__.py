"""``python -m leakycuda`` (and ``torchrun ... -m leakycuda reproduce ...``): the ``leakycuda`` command line."""
import sys

from .cli import main

sys.exit(main())
