"""The one I/O layer every stage reads and writes through.

    uris        local paths and s3:// / gs:// URIs, credentials kept out of every message
    storage     a folder (local or URI) with atomic whole-file writes
    files       which files a path, glob, directory or URI names; their formats; fingerprints
    readers     the one reader: CSV / JSON lines / JSON array / Parquet / Hugging Face
                datasets, whole or streamed from a recorded position, every row with its
                file, 1-based row and line
    values      what makes one value unusable (empty, not text, undecodable) and the
                canonical text of a label, ID or language
    rows        the one row validator: good rows as an Arrow table, bad ones as quarantine
                entries
    quarantine  the one quarantine format and writer
    ids         the one duplicate-ID check (an on-disk index, bounded memory)

Pure: pyarrow, sqlite3 and the standard library (Hugging Face `datasets` only when such a
source is read).
"""
