"""The backup store: deduplicated, compressed, optionally encrypted snapshots
of volume images, in a directory or on S3 (s3://BUCKET/PREFIX).

Start here:
    store.py     Store: init/open, list, show, read (iter_image, restore_to_file),
                 verify, check, forget, prune, gc; the object layout
    writer.py    SnapshotWriter: stream an image in, in any order; commit
    image.py     an image written out (a file or device; O_DIRECT), and the
                 digest of what a restore wrote (WrittenImage)
    gc.py        mark-and-sweep safe beside running writers; retention rules
    index.py     the index format and the image digest
    envelope.py  the stored-object format: compression, encryption, keys
    backend.py   the backend interface and the directory backend
    s3.py        the S3 backend (boto3), its settings and errors
    catalog.py   the SQLite cache of manifests
    errors.py    what can go wrong, by what to do next
"""
from agents.store.envelope import new_key_file
from agents.store.errors import (
    ConcurrentSweep,
    CorruptObject,
    ImageIncomplete,
    KeyRefused,
    ObjectMissing,
    StoreBadInput,
    StoreError,
)
from agents.store.gc import GcReport, PrunePlan, RetentionPolicy
from agents.store.store import Extent, Store, VerifyReport, init_dir, open_dir
from agents.store.writer import MANIFEST_FIELDS, SnapshotWriter
