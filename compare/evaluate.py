"""`python -m flax_impl.evaluate` for any workdir, torch_ref.train's included (see --help).

The same command with `compare.workdirs.READERS` passed in: a torch workdir's weights are
converted to Flax on load.
"""

import functools
import sys

from compare.workdirs import READERS
from flax_impl import evaluate

main = functools.partial(evaluate.main, readers=READERS, prog="python -m compare.evaluate")

if __name__ == "__main__":
    sys.exit(main())
