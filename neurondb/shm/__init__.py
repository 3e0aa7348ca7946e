"""Shared memory of one installation: segments, robust locks, latches, the control block, the rate-limit
buckets. Import from the submodules (this package re-exports nothing).

See `control.py` for the layout, `lock.py` for what happens when a holder is killed, `segment.py`
for why numpy views never outlive their mapping and why the resource tracker cannot unlink a segment,
`buckets.py` for the token buckets every process shares.
"""
