"""Where training data comes from: a Label Studio project or an export file.

The code lives in :mod:`lsbert.labelstudio.source` (the predictor rebuilds its embedding heads from the same
download); this module keeps the trainer's names.
"""

from lsbert.labelstudio.source import (
    EXPORT_TIMEOUT_S,
    DataSourceError,
    LabelStudioSource,
    read_export_file,
    read_label_config,
)

__all__ = ["EXPORT_TIMEOUT_S", "DataSourceError", "LabelStudioSource", "read_export_file", "read_label_config"]
