"""splitd's agents: the programs that run beside the daemon, on the
application host and on the backup host, and the NBD client they share."""
