"""A module the tests preload in the manager; records the pid that imported it."""

import os

IMPORT_PID = os.getpid()
