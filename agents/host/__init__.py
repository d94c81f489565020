"""splitd-host, the agent on the application host (DESIGN.md "Backup", steps 1-2).

    mounts.py    the filesystem holding a directory (mountinfo + st_dev)
    freeze.py    FIFREEZE / FITHAW, and frozen(): the window, always thawed
    watchdog.py  the separate process that thaws what stays frozen too long,
                 and the journal a new agent thaws leftovers from
    attach.py    volumes attached as block devices, recorded in the state dir
    daemon.py    the admin client for the daemon behind an attachment
    hooks.py     the pre-freeze / post-thaw hook
    prepare.py   prepare(): fs -> device -> volume -> hook -> freeze, split, thaw
    state.py     HostState: what prepare needs, built by the CLI or the service
    cli.py       splitd-host
"""
