import sys

from npc_engine.train.cli import main

sys.exit(main())
