"""The one error type the data layer raises for problems a user can fix (paths, layouts, files)."""


class DatasetError(ValueError):
    """A dataset on disk does not match its expected layout, or one of its files is unreadable.

    The message always names the offending path and, where a layout is involved, shows the tree
    that was expected, so the user can fix the data without reading the code.
    """
