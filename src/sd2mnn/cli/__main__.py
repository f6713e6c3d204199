import sys

from sd2mnn.cli import main

sys.exit(main())
