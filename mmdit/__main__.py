"""``python -m mmdit`` works like the ``mmdit`` command (e.g. under ``torchrun -m mmdit``)."""
import sys

from .cli import main

sys.exit(main())
