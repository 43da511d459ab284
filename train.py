"""lit-align entry point: ``python train.py fit --config configs/chord_phi.yaml``.

Subcommands: fit, validate, test, predict. ``--print_config`` shows every setting.
"""

from lit_align.cli import main

if __name__ == "__main__":
    main()
