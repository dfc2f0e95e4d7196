"""torch_ref.train workdirs read as Flax models, through the weight conversion.

`READERS` is what `flax_impl.predict` and `flax_impl.evaluate` take to read a torch workdir
(the port itself imports neither torch nor `compare`): `python -m compare.predict` and
`python -m compare.evaluate` are those commands with it passed in.
"""

from __future__ import annotations

from pathlib import Path

from compare.convert import ConversionError, torch_to_flax
from flax_impl.common.errors import WorkdirError
from flax_impl.common.workdir import load_config
from torch_ref.train import restore_state_dict


def torch_workdir_variables(workdir: Path) -> dict:
    """The Flax variables of the model a torch_ref.train workdir scored (WorkdirError if its
    weights do not fit the recorded model)."""
    config = load_config(workdir)
    try:
        return torch_to_flax(restore_state_dict(workdir), config.model, config.widths)
    except ConversionError as error:
        raise WorkdirError(f"{workdir}: the torch weights do not fit the model ({error})") from None


READERS = {"torch": torch_workdir_variables}
