"""splitd's agents: the programs that run beside the daemon, on the
application host (`host`: splitd-host attaches volumes, freezes, splits,
thaws) and on the backup host, and the NBD client they share (`nbd`)."""
