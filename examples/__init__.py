"""Research forks built on the library's seams, each trained by ``train.py`` (see README)."""
