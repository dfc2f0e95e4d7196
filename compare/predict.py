"""`python -m flax_impl.predict` for any workdir, torch_ref.train's included (see --help).

The same command with `compare.workdirs.READERS` passed in: a torch workdir's weights are
converted to Flax on load.
"""

import functools
import sys

from compare.workdirs import READERS
from flax_impl import predict

main = functools.partial(predict.main, readers=READERS, prog="python -m compare.predict")

if __name__ == "__main__":
    sys.exit(main())
