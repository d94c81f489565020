"""Names shared by the daemon, splitctl and the agents: pair states, read
policies and wait targets (states.py), admin error codes and the errors that
carry them (errors.py), and the rules for volume names and sizes (names.py).

Rule of this package: it imports nothing from daemon, controller or volumes,
and nothing heavier than the standard library's basics, so a client can use it
without pulling in the daemon."""
