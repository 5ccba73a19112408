"""The command line: the argument parser (`args`) and the commands (`main`), each calling the Python API.

May import: every wing."""
