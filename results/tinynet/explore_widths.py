"""TinyNet's width exploration (results/tinynet/validation.txt): train a Net of other widths.

Usage: python results/tinynet/explore_widths.py 8,10,12,12,14,14 --seed 0 --validation 10000 \\
    --dropout 0 --workdir DIR   (any flag of python -m flax_impl.train after the widths)
"""

import functools
import sys

import flax_impl.config as config
import flax_impl.model as model

widths = tuple(int(w) for w in sys.argv[1].split(","))
name = "widths_" + "_".join(map(str, widths))
config.MODELS = (*config.MODELS, name)  # registered for this process only
model.MODELS[name] = functools.partial(model.Net, widths=widths)

from flax_impl import train  # noqa: E402  (after the registration: its parser reads MODELS)

sys.exit(train.main(["--model", name, *sys.argv[2:]]))
