"""mitmdump entry point: `mitmdump --mode reverse:http://ORIGIN -s addons/edge.py [--set edge_config=FILE]`.

Kept thin: the chain lives in addons.chain."""

import os
import sys

try:
    from addons.chain import Edge
except ImportError:     # run from a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from addons.chain import Edge

addons = [Edge()]
