"""The agents that run beside splitd on other machines: `store` (the backup
store: deduplicated, compressed, optionally encrypted snapshots of volumes)."""
