"""The guest side of aerate.

Python 3.8+, standard library only; systemd-python and pyroute2 are used when present.
"""
