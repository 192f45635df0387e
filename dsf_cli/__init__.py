"""The ``dsf`` command line: a thin mapping from flags to library calls."""
