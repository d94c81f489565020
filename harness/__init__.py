"""What the tests, bench/ and scripts/crash.py share to run splitd for real.

  harness.splitd              start the daemon on a directory, wait for it to
                              answer, stop it; admin calls through splitctl's client
  harness.powerloss.cutdisk   an NBD server whose unflushed writes a "cut" loses
  harness.powerloss.stack     ext4 on a loop device on nbdfuse on a cutdisk

A package of its own (listed in pyproject.toml) so that scripts run from any
directory import it without editing sys.path.
"""
