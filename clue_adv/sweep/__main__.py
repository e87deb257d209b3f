"""`python -m clue_adv.sweep CONFIG.yaml [--force]`: the worker process of a parallel local sweep."""

import sys

from clue_adv.sweep.worker import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
