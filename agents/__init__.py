"""splitd's agents: the programs that run beside the daemon, on the
application host and on the backup host: `host` (the application host: attach
volumes, freeze, split, thaw), the NBD client they share (`nbd`) and the
backup store (`store`: deduplicated, compressed, optionally encrypted
snapshots of volumes)."""
