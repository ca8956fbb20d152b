"""RoIAlign vs RoIPool ablation: a thin wrapper around `maskrt ablate` (same arguments).

    python bench/ablation.py --minutes 4 --out runs/ablation
"""
import sys

from maskrt.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
