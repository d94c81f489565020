"""splitd's agents: the programs that run beside the daemon, on the
application host and on the backup host: `host` (the application host: attach
volumes, freeze, split, thaw), `backup` (the backup agent: a split secondary
into a store, incremental forever, and restores), the NBD client they share
(`nbd`) and the backup store (`store`: deduplicated, compressed, optionally
encrypted snapshots of volumes)."""
