"""The commands behind ``run.sh`` (``./run.sh model``, later train, demo, study, merge).

This is the top layer: it may import ``eval``, ``prep`` and ``ludwig_mt``, and nothing imports it except the tests
and ``run.sh``, so a command's argument parsing, progress and error lines never leak into the library.
"""
