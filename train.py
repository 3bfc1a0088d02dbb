"""Entry point: `torchrun --nproc_per_node 8 train.py --config FILE key=value ...` (or `python train.py` for one process).

Parse -> build -> train -> close; everything else lives in the `vlora` package (the loop: vlora/train.py).
"""

import sys

from vlora.train import main

if __name__ == "__main__":
    sys.exit(main())
