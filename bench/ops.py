"""Per-operator benchmark, dense vs delta (same as `deluceva bench ops`): python bench/ops.py [--threads 1] [--quick].

Writes bench/results/ops.json, prints a table and saves bench/results/ops.png; see deluceva.delta.kernels.opbench.
"""

import sys

from deluceva.delta.kernels.opbench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
