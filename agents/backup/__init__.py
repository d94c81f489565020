"""The backup agent: reads a split secondary (or any export) over NBD into a
backup store (agents.store), and writes snapshots back.

    chain      which snapshot an incremental may build on, or why it may not
    reader     backup_export(): stream an export into a SnapshotWriter, full or
               incremental (x-splitd:delta), many reads in flight
    restore    restore_to_uri() / restore_to_file(): a snapshot back into an
               export (WRITE_ZEROES for zero runs) or a sparse file
    progress   a one-line progress bar on a terminal (bytes, rate, ETA)

The CLI is `splitctl backup ...` (splitctl/commands/backup_agent.py); it
imports this package only inside its commands.
"""
from agents.backup.chain import BackupSource, ChainDecision, choose_parent
from agents.backup.reader import BackupResult, backup_export
from agents.backup.restore import RestoreResult, restore_to_file, restore_to_uri

__all__ = ["BackupResult", "BackupSource", "ChainDecision", "backup_export", "choose_parent",
           "restore_to_file", "restore_to_uri", "RestoreResult"]
