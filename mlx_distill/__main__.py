import sys

from mlx_distill.cli import main

sys.exit(main())
