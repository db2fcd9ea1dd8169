"""loopstack: pretraining stack for looped (recurrent-depth) transformers.

This small package holds what every part shares: the CLI entry, the typed-config machinery and the
user-error type. The work lives in `data_pipeline`, `pretrain` and `launch`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loopstack")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"
