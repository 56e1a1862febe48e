"""`xendbg attach`: the full-screen debugger (prompt_toolkit), drawing what gdb's -xen-* MI commands render."""
