import sys

from binarize.cli.main import main

sys.exit(main())
