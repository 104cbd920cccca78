import sys
from pathlib import Path

# Let the test modules here import the fake-tree writers beside them.
sys.path.insert(0, str(Path(__file__).parent))
