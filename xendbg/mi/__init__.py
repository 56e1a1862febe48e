"""gdb driven over gdb/MI: the client, MiTarget, and starting gdb and a platform for `xendbg attach`."""

# The bundled platforms `xendbg attach --platform` boots (fixtures/run; fixtures/README.md says what each is).
PLATFORMS = ("shim32", "xen64", "linux64", "xen32", "xen32shared")
