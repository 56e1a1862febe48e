"""Xen's own trace buffers (xentrace), read without a dom0 toolstack: the buffer layout and records
(buffers.py, records.py, events.py), one trace from the per-CPU buffers (merge.py) and xentrace's
binary file format (xtfile.py).  Front-end independent: no gdb here."""
