"""gdb driven over gdb/MI: the client, MiTarget, and starting gdb and a platform for `xendbg attach`."""
