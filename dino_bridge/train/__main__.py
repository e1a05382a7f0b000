import sys

from .args import main

sys.exit(main())
