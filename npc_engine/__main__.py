import sys

from npc_engine.cli import main

sys.exit(main())
