"""The command-line apps: one thin Hydra app per console script.

Each composes its primary config from the packaged ``fairclip.conf`` (plus any
``hydra.searchpath`` a user adds) and calls library functions; ``--help`` lists the config
groups, and every option is a ``key=value`` override.
"""
