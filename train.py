"""Train, validate or test any lit_robust defense: ``python train.py fit --config configs/quickstart.yaml``."""

from lit_robust.cli import main

if __name__ == "__main__":
    main()
