"""splitd's agents: the programs that run beside the daemon, on the
application host (`host`: attach volumes, freeze, split, thaw) and on the
backup host, the NBD client they share (`nbd`), and the backup store
(`store`: deduplicated, compressed, optionally encrypted snapshots of volumes)."""
