"""What the tests, bench/ and scripts/crash.py share to run splitd for real.

  harness.splitd              start the daemon on a directory, wait for it to
                              answer, stop it; admin calls through splitctl's client
  harness.powerloss.cutdisk   an NBD server whose unflushed writes a "cut" loses
  harness.powerloss.stack     ext4 on a loop device on nbdfuse on a cutdisk
  harness.netns               network namespaces joined by veth; processes in them
                              through nsenter --net
  harness.pki                 throw-away CA and server certificates (openssl)
  harness.site                three hosts in namespaces: splitd in `storage` with
                              app and backup ports, the host agent in `app`
  harness.writer              a process that keeps writing files and logs each
                              one's checksum and completion time

A package of its own (listed in pyproject.toml) so that scripts run from any
directory import it without editing sys.path.
"""
