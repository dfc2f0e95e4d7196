import sys

if sys.argv[:1] == ["-m"]:  # run as `python -m`: a Ctrl-C while the imports load is one line
    from flax_impl.common.signals import exit_at_once_on_signals

    exit_at_once_on_signals()
