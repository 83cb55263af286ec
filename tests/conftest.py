import os
import sys

# Import the package of this checkout (also from a git worktree), ahead of any installed copy.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "CoDETR"))
