"""``python -m ironcore …`` (and so ``torchrun -m ironcore train …``)."""

from ironcore.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
