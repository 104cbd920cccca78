"""The error the data layer raises for problems a user can fix (paths, layouts, files).

Defined with fastprompt's other user-facing errors in `fastprompt.errors`; the data modules import
it from here, their own layer's name for it.
"""
from ..errors import DatasetError

__all__ = ["DatasetError"]
